"""The NixOS installer ISO, remastered: the offline medium under one directory of the ISO and an
"Install HOST offline" entry per host in every boot menu (`mediabuilder build --installer`)."""
