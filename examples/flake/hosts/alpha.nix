# alpha: a web server.
{ pkgs, ... }:
{
  environment.systemPackages = [ pkgs.nginx ];
  environment.etc."nginx/nginx.conf".text = ''
    events { }
    http { server { listen 80; root /var/www; } }
  '';
  systemd.services.nginx = {
    description = "nginx web server";
    script = "exec ${pkgs.nginx}/bin/nginx -c /etc/nginx/nginx.conf";
  };
}
