# Shared settings for every host of the site (this directory is a `path:` flake input
# with flake = false; hosts read it with import and builtins.readFile).
{
  domain = "example.invalid";
  timeZone = "Europe/Berlin";
  admins = [ "alice" "bob" ];
  ntpServers = [ "ntp1.example.invalid" "ntp2.example.invalid" ];
}
