# beta: a database server.
{ pkgs, ... }:
{
  environment.systemPackages = [ pkgs.postgresql ];
  environment.etc."postgresql/postgresql.conf".text = ''
    listen_addresses = '*'
    data_directory = '/var/lib/postgresql/15'
  '';
  systemd.services.postgresql = {
    description = "PostgreSQL server";
    script = "exec ${pkgs.postgresql}/bin/postgres -D /var/lib/postgresql/15";
  };
}
