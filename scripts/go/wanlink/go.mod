module tailscale-egress.invalid/wanlink

go 1.26
