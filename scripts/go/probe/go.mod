module tailscale-egress.invalid/probe

go 1.26
