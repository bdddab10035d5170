{ config, pkgs, lib, site, tools, ... }:
let
  siteConfig = import "${site}/site.nix";
in
{
  environment.systemPackages = with pkgs; [
    bash coreutils gnugrep gnused gawk findutils gzip xz util-linux kmod e2fsprogs
    systemd shadow iproute2 procps less nano openssh sudo nix
    tools.packages.${pkgs.system}.motd-render
  ];

  environment.etc = {
    "hostname".text = config.networking.hostName;
    "motd".text = builtins.readFile "${site}/motd";
    "issue".text = builtins.readFile "${site}/issue";
    "ssh/banner".text = builtins.readFile "${site}/ssh/banner";
    "ssh/authorized_keys.d/root".text = builtins.readFile "${site}/ssh/authorized_keys";
    "ssh/sshd_config".text = ''
      Banner /etc/ssh/banner
      AuthorizedKeysFile /etc/ssh/authorized_keys.d/%u
      Subsystem sftp ${pkgs.openssh}/libexec/sftp-server
    '';
    "os-release".text = ''
      NAME=NixOS
      ID=nixos
      VERSION_ID="${config.system.nixos.version}"
      PRETTY_NAME="Example NixOS ${config.system.nixos.version}"
    '';
    "flake-revision".text = config.system.configurationRevision;
    "profile".text = ''
      export PATH=/run/current-system/sw/bin
      export SHELL=${pkgs.bash}/bin/bash
      export TZDIR=/etc/zoneinfo
    '';
    "zoneinfo".source = "${pkgs.tzdata}/share/zoneinfo";
    "localtime".source = "${pkgs.tzdata}/share/zoneinfo/${siteConfig.timeZone}";
    "ssl/certs/ca-certificates.crt".source = "${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt";
    "nix/nix.conf".text = ''
      experimental-features = nix-command flakes
      substituters =
    '';
    "sudoers".text = builtins.concatStringsSep "\n" (map (u: "${u} ALL=(ALL) ALL") siteConfig.admins);
    "timesyncd.conf".text = "NTP=${toString siteConfig.ntpServers}";
  };

  systemd.services = {
    sshd = { description = "SSH daemon"; script = "exec ${pkgs.openssh}/bin/sshd -D"; };
    motd = { description = "Render the motd"; script = "exec ${tools.packages.${pkgs.system}.motd-render}/bin/motd-render"; };
  };

  boot.kernelParams = [ "console=ttyS0" "quiet" ];
}
