"""tailscale-egress: pods that reach the internet only through a Tailscale exit node.

protected namespaces --(proxy)--> relay --(tailnet)--> exit node VM --> internet
"""

import pulumi
import pulumi_kubernetes as k8s

from builders.names import StackNames, vm_spec
from builders.network_policies import relay_egress
from builders.proxy_env import PROXY_CONFIGMAP, proxy_environment
from builders.relay import PROXY_PORTS, relay_host
from components.admission_guard import AdmissionGuard, AdmissionGuardArgs, guard_preflight
from components.egress_relay import EgressRelay, EgressRelayArgs
from components.exit_node import HetznerExitNode, HetznerExitNodeArgs
from components.exit_node_approval import ExitNodeApproval
from components.node_guard import NodeGuard, NodeGuardArgs
from components.protected_namespace import ProtectedNamespace, ProtectedNamespaceArgs
from components.tailnet_access import TailnetAccess, TailnetAccessArgs
from config import PROJECT, load_config
from preflight import check_environment, check_exit_node_offer, check_tailnet_policy

# 1. Configuration and preflight: every problem is reported before anything is created.
cfg = load_config()
cluster_now = check_environment(cfg)
check_exit_node_offer(cfg.exit_node)
current_policy = check_tailnet_policy(cfg)
names = StackNames.for_stack(pulumi.get_project(), pulumi.get_stack())
policies_now = cluster_now.network_policies if cluster_now else None
deployer = guard_preflight(cfg.cluster, policies_now) if cfg.cluster.admission_guard else None
given_relay_key = pulumi.Config(PROJECT).get_secret("relayAuthKey")

# 2. Tailnet access: auth keys (and the policy file, when the stack manages it);
#    nothing at all when the relay's key is given (a cluster-only stack).
tailnet = TailnetAccess(
    "tailnet",
    TailnetAccessArgs(
        cfg.tailnet,
        names,
        needs_exit_node_key=cfg.exit_node.managed,
        current_policy=current_policy,
        exit_node_spec=vm_spec(cfg.exit_node.server_type, cfg.exit_node.location, cfg.exit_node.image),
        supplied_relay_key=given_relay_key,
    ),
)

# 3. Exit node: a Hetzner VM, joined and approved as code; or one you bring.
if cfg.exit_node.managed:
    assert tailnet.exit_node_auth_key is not None and tailnet.exit_node_key_id is not None
    vm = HetznerExitNode(
        "exit-node", HetznerExitNodeArgs(cfg.exit_node, names, tailnet.exit_node_auth_key, tailnet.exit_node_key_id)
    )
    approval = ExitNodeApproval("exit-node-approval", vm.hostname, pulumi.ResourceOptions(depends_on=[vm]))
    exit_hostname, exit_tailnet_ip, exit_public_ips = vm.hostname, approval.tailnet_ip, vm.public_ips
else:
    exit_hostname = pulumi.Output.from_input("(your own exit node)")
    exit_tailnet_ip = pulumi.Output.from_input(str(cfg.exit_node.existing_tailnet_ip))
    exit_public_ips = pulumi.Output.from_input(cfg.exit_node.existing_public_ips)

# 4. Protected namespaces: their policies exist before the relay starts.
cluster = k8s.Provider("cluster", context=cfg.cluster.context, kubeconfig=cfg.cluster.kubeconfig)
in_cluster = pulumi.ResourceOptions(provider=cluster)
relay_address = relay_host(cfg.cluster.relay_namespace, cfg.cluster.cluster_domain)
proxy_env = proxy_environment(relay_address, cfg.cluster.pod_cidr, cfg.cluster.service_cidr, cfg.cluster.cluster_domain)
protected = [
    ProtectedNamespace(
        f"protected-{ns.name}",
        ProtectedNamespaceArgs(ns, cfg.cluster.relay_namespace, PROXY_PORTS, proxy_env, cfg.cluster.ingress_from),
        in_cluster,
    )
    for ns in cfg.cluster.protected_namespaces
]

# The node guard: what kube-router accepts before any policy (ICMP out, the node's NodePorts)
# and what no policy sees (pods' IPv6 link-local).
if cfg.cluster.node_guard:
    NodeGuard("node-guard", NodeGuardArgs(cfg.cluster), in_cluster)

# 5. The relay: SOCKS5 and HTTP CONNECT proxies into the tailnet, via the exit node.
public_egress = cfg.tailnet.relay_egress == "public"
if public_egress:
    pulumi.log.warn(
        "tailnet.relayEgress is public: the relay may reach any public address. While its exit node is missing"
        " from the tailnet (removed, not yet joined, before the relay's first netmap), tailscaled dials proxy"
        " requests directly, and they leave from your cluster's network with your own public address instead"
        " of the exit node's. Set tailnet.relayEgress to pinned to fail closed."
    )
egress = exit_public_ips.apply(
    lambda ips: relay_egress(
        ips,
        cfg.tailnet.login_server_address,
        cfg.tailnet.control_plane_cidrs,
        hosted_control_plane=cfg.tailnet.login_server is None,
        public_internet=public_egress,
    )
)
relay = EgressRelay(
    "relay",
    EgressRelayArgs(
        cluster=cfg.cluster,
        hostname=names.relay_hostname,
        auth_key=tailnet.relay_auth_key,
        exit_node_ip=exit_tailnet_ip,
        egress=egress,
        protected_namespaces=[ns.name for ns in cfg.cluster.protected_namespaces],
        login_server=cfg.tailnet.login_server,
        start_after=protected,
    ),
    in_cluster,
)

# The admission guard: nothing but the stack decides a protected namespace's egress.
if deployer is not None:
    AdmissionGuard(
        "admission-guard",
        AdmissionGuardArgs(
            names.prefix,
            deployer,
            [ns.name for ns in cfg.cluster.protected_namespaces],
            cfg.cluster.relay_namespace,
            cfg.cluster.ingress_from,
        ),
        in_cluster,
    )

# 6. Outputs: nothing secret.
pulumi.export("exitNodeHostname", exit_hostname)
pulumi.export("exitNodeTailnetIp", exit_tailnet_ip)
pulumi.export("exitNodePublicIps", exit_public_ips)
pulumi.export("relayHttpProxy", relay.http_proxy)
pulumi.export("relaySocksProxy", relay.socks_proxy)
pulumi.export("relayEgress", egress.apply(lambda e: e.mode))
pulumi.export("protectedNamespaces", [ns.name for ns in cfg.cluster.protected_namespaces])
pulumi.export(
    "usage",
    f"add to a container: envFrom: [{{configMapRef: {{name: {PROXY_CONFIGMAP}}}}}]"
    " (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY)",
)
