{
  description = "The systems the site's tools are built for (shaped like github:nix-systems/default)";

  outputs = _: { };
}
