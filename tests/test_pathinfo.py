"""`parse_path_info_json` on every shape of `nix path-info --json`.

`data/pathinfo-2.8.json` is real output of Debian's Nix 2.8 (`nix path-info --json -r` of the
example's alpha toplevel, signed with a throwaway key `sample-1`, plus one `nix-store --add`ed,
content-addressed path). The newer shapes are made from it the way those Nix versions print the
same store: 2.19+ keys objects by full path, 2.23+ writes absent fields as null, 2.33's versioned
document keys by base name and writes references as base names and `ca` as an object.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from mediabuilder.errors import FormatError, InvalidInput
from mediabuilder.store import nix32
from mediabuilder.store.hashes import Hash
from mediabuilder.store.pathinfo import PathInfo, parse_path_info_json
from mediabuilder.store.storepath import StorePath

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "pathinfo-2.8.json"
STORE = "/nix/store/"
TOPLEVEL = "/nix/store/jpdfgycdykghzqrmp6740d7ngyqg7fjr-nixos-system-alpha-23.11.20231103.5ac6fce"
CA_PATH = "/nix/store/0ys6rs11hs4shyhpbq0zrmkxaznpdd4z-pathinfo-sample-source"


def recorded() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(SAMPLE.read_text())
    return data


def shape_2_19(nulls: bool = False) -> dict[str, Any]:
    """An object keyed by full path; with `nulls` (2.23+) absent fields are null."""
    out: dict[str, Any] = {}
    for obj in copy.deepcopy(recorded()):
        path = obj.pop("path")
        if nulls:
            for key in ("deriver", "ca"):
                obj.setdefault(key, None)
            obj.setdefault("signatures", [])
            obj.setdefault("ultimate", False)
        out[path] = obj
    return out


def _base(path: str) -> str:
    assert path.startswith(STORE)
    return path[len(STORE):]


def _ca_object(ca: str) -> dict[str, str]:
    prefix = "fixed:r:sha256:"
    assert ca.startswith(prefix), ca
    digest = nix32.decode(ca[len(prefix):])
    return {"method": "nar", "hash": "sha256-" + base64.b64encode(digest).decode()}


def shape_2_33() -> dict[str, Any]:
    info: dict[str, Any] = {}
    for obj in copy.deepcopy(recorded()):
        path = obj.pop("path")
        obj["references"] = [_base(r) for r in obj["references"]]
        obj["deriver"] = _base(obj["deriver"]) if "deriver" in obj else None
        obj["ca"] = _ca_object(obj["ca"]) if "ca" in obj else None
        obj.setdefault("signatures", [])
        info[_base(path)] = obj
    return {"version": 2, "storeDir": "/nix/store", "info": info}


def by_path(infos: list[PathInfo]) -> dict[str, PathInfo]:
    result = {str(i.path): i for i in infos}
    assert len(result) == len(infos)
    return result


def test_recorded_sample_is_what_the_tests_assume() -> None:
    data = recorded()
    assert len(data) == 43
    assert len({o["path"] for o in data}) == 43
    ca = [o for o in data if "ca" in o]
    assert [o["path"] for o in ca] == [CA_PATH]
    signed = [o for o in data if o.get("signatures")]
    assert [o["path"] for o in signed] == [TOPLEVEL]
    assert all("deriver" in o for o in data if "ca" not in o)


def test_nix_2_8_list() -> None:
    infos = by_path(parse_path_info_json(SAMPLE.read_text()))
    assert len(infos) == 43
    top = infos[TOPLEVEL]
    assert top.path == StorePath.parse(TOPLEVEL)
    assert top.nar_hash == Hash.parse("sha256-9Dx14LjY1bkuS57oc+9LlQQONKeDLdOlXaNhXHv+iJk=")
    assert top.nar_size == 5304
    assert [r.full for r in top.references] == [
        "/nix/store/21x6xkpbrziww6sz5rcv9sr3q7ppbq3h-initrd-linux-6.1.64",
        "/nix/store/6jm21r4va07q500l7iwsv385522s44jq-systemd-254.6",
        "/nix/store/fp9vlm0z639nxk9smvnlfsi1y2yn28pg-linux-firmware-20231111",
        "/nix/store/ja4rmqzddp82lfc24bkw00hv1vwqm3vl-busybox-static",
        TOPLEVEL,
        "/nix/store/rrkffdjy9an2w8x2jpxbfkqw4fmmhlfx-system-path",
        "/nix/store/sd04pyxqngpc5s6fncj1n6q64bxibg8k-etc",
        "/nix/store/sv6lrjim6l1bi5nrzlab0jxj0qbyasxk-linux-6.1.64",
    ]
    assert top.deriver == StorePath.parse(
        "/nix/store/qzqzyqfppncnzs54rs1gb8sjnnv6fxqp-nixos-system-alpha-23.11.20231103.5ac6fce.drv")
    assert top.sigs == ("sample-1:TB5L1nlFkizG9LKapDr6dTsLtOFJrBYTrMRI/pOWpLzULUFttLMuSULesj119OvuV2ZToOEJOy1h"
                        "ooLbfXdRDQ==",)
    assert top.ca is None
    src = infos[CA_PATH]
    assert src.ca == "fixed:r:sha256:1dxnvr1jk3yv51q9v2d66hv5x3j0gslm796wqa63ils504443mdj"
    assert src.deriver is None
    assert src.references == ()
    assert src.sigs == ()
    assert src.nar_size == 328
    for info in infos.values():
        assert list(info.references) == sorted(info.references)


@pytest.mark.parametrize("shape", ["2.19", "2.23", "2.33"])
def test_every_shape_parses_to_the_same_path_infos(shape: str) -> None:
    document = {"2.19": lambda: shape_2_19(), "2.23": lambda: shape_2_19(nulls=True), "2.33": shape_2_33}[shape]()
    expected = by_path(parse_path_info_json(SAMPLE.read_text()))
    got = by_path(parse_path_info_json(json.dumps(document)))
    assert got == expected


def test_2_33_ca_object_becomes_the_narinfo_form() -> None:
    infos = by_path(parse_path_info_json(json.dumps(shape_2_33()).encode()))
    assert infos[CA_PATH].ca == "fixed:r:sha256:1dxnvr1jk3yv51q9v2d66hv5x3j0gslm796wqa63ils504443mdj"


def test_2_19_null_is_an_invalid_path() -> None:
    document = shape_2_19(nulls=True)
    missing = "/nix/store/00000000000000000000000000000000-not-built"
    document[missing] = None
    with pytest.raises(InvalidInput, match=f"not valid in the Nix store: {missing}"):
        parse_path_info_json(json.dumps(document))


def test_2_18_invalid_entry_is_an_error() -> None:
    data = recorded()
    missing = "/nix/store/00000000000000000000000000000000-not-built"
    data.append({"path": missing, "valid": False})
    with pytest.raises(InvalidInput, match=missing):
        parse_path_info_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "not json", "42", '"a string"'])
def test_not_path_info_json(text: str) -> None:
    with pytest.raises(FormatError, match="nix path-info"):
        parse_path_info_json(text)


def test_entry_without_nar_hash_is_a_format_error() -> None:
    document = shape_2_19()
    del document[TOPLEVEL]["narHash"]
    with pytest.raises(FormatError, match="unexpected entry"):
        parse_path_info_json(json.dumps(document))
