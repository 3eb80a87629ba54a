"""``deploy/``: what the container file, Kubernetes manifests and proxy configs must agree on.

The manifests cannot run here (no container engine, no cluster), so this
checks them against the app instead: probe paths it serves, the port it binds,
a grace period that outlasts a drain, settings it accepts. HAProxy's and
nginx's own checkers run on their files.
"""

from __future__ import annotations

import re
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from tests.brokers import require_broker
from tests.conftest import serving
from tests.e2e import STEP_TIMEOUT, TARGETS_BY_NAME, ready_instances
from triows.backend import check_backend_settings
from triows.backends.amqp091 import SCHEMES as AMQP091_SCHEMES
from triows.backends.broker_url import parse_broker_urls
from triows.client import open_client, post_send
from triows.cluster import (
    DEFAULT_FRONT_PORT,
    DEFAULT_INSTANCE_PORTS,
    HAPROXY_CONFIG,
    debian_executable,
)
from triows.process import free_port, stop_process, wait_for_status
from triows.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"


def manifests() -> dict[str, dict[str, Any]]:
    """Every object in ``deploy/k8s/*.yaml``, by kind (one of each kind)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in objects, f"two {document['kind']}s in deploy/k8s"
            objects[document["kind"]] = document
    return objects


def deployment_container() -> dict[str, Any]:
    containers = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def configmap_settings() -> dict[str, str]:
    data: dict[str, str] = manifests()["ConfigMap"]["data"]
    return data


def container_port(name: str) -> int:
    ports = {port["name"]: port["containerPort"] for port in deployment_container()["ports"]}
    return int(ports[name])


def containerfile() -> dict[str, list[str]]:
    """Instructions of ``deploy/Containerfile`` (continuation lines joined), by keyword."""
    instructions: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Containerfile").read_text())
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.setdefault(keyword.upper(), []).append(rest.strip())
    return instructions


def bind_port(bind: str) -> int:
    return int(bind.rpartition(":")[2])


# --- Kubernetes -----------------------------------------------------------------


def test_the_manifests_have_what_a_cluster_operator_expects() -> None:
    kinds = set(manifests())
    assert {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "RabbitmqCluster",
    } <= kinds


def test_every_selector_matches_the_pod_labels() -> None:
    objects = manifests()
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [
        objects["Deployment"]["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        objects["Deployment"]["metadata"]["name"],
    )


async def test_the_probe_paths_are_the_ones_the_app_answers_200_on() -> None:
    container = deployment_container()
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    async with serving() as client:
        for probe in (readiness, liveness):
            assert (await client.get(probe["path"])).status_code == 200


def test_probes_and_service_reach_the_port_the_app_binds() -> None:
    objects = manifests()
    container = deployment_container()
    bound = bind_port(configmap_settings()["TRIOWS_BIND"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container_port(container[probe]["httpGet"]["port"]) == bound
    for port in objects["Service"]["spec"]["ports"]:
        assert container_port(port["targetPort"]) == bound


def test_the_grace_period_outlasts_prestop_drain_and_close() -> None:
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    settings = Settings.from_env(configmap_settings())
    command = deployment_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    needed = pre_stop + settings.drain_timeout + settings.close_timeout
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_settings_come_from_the_configmap_and_are_valid() -> None:
    data = configmap_settings()
    known = {field.metadata["env"] for field in Settings.__dataclass_fields__.values()}
    assert set(data) <= known, f"unknown settings: {set(data) - known}"
    # With the Secret's values, the settings are ones triows starts with.
    secret = manifests()["Secret"]["stringData"]
    settings = Settings.from_env(
        {**data, "TRIOWS_SECRET": secret["secret"], "TRIOWS_BROKER_URL": secret["broker-url"]}
    )
    assert settings.backend == "amqp091"
    container = deployment_container()
    assert {"configMapRef": {"name": manifests()["ConfigMap"]["metadata"]["name"]}} in container[
        "envFrom"
    ]


def test_the_secret_values_come_from_the_secret_and_it_has_every_key() -> None:
    secret = manifests()["Secret"]
    from_secret = {
        variable["name"]: variable["valueFrom"]["secretKeyRef"]
        for variable in deployment_container()["env"]
        if "secretKeyRef" in variable.get("valueFrom", {})
    }
    assert set(from_secret) == {"TRIOWS_SECRET", "TRIOWS_BROKER_URL"}
    for reference in from_secret.values():
        assert reference["name"] == secret["metadata"]["name"]
        assert reference["key"] in secret["stringData"]
    # Secrets never sit in the ConfigMap.
    assert not {"TRIOWS_SECRET", "TRIOWS_BROKER_URL"} & set(configmap_settings())


def test_the_container_has_resource_requests_and_limits() -> None:
    resources = deployment_container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert {"cpu", "memory"} <= set(resources["limits"])


# --- RabbitMQ, as its Kubernetes operator runs it --------------------------------

# What the backends other than amqp091 need enabled: AMQP 1.0 (amqp10), STOMP (stomp).
PLUGINS_TRIOWS_USES = {"rabbitmq_amqp1_0", "rabbitmq_stomp"}
# The AMQP port of the operator's services.
OPERATOR_AMQP_PORT = 5672


def rabbitmq_cluster() -> dict[str, Any]:
    cluster: dict[str, Any] = manifests()["RabbitmqCluster"]
    return cluster


def node_host_names(cluster: dict[str, Any]) -> list[str]:
    """The stable DNS names the operator gives the nodes: NAME-server-i.NAME-nodes.NAMESPACE
    (pod i of the StatefulSet NAME-server behind the headless Service NAME-nodes)."""
    name = cluster["metadata"]["name"]
    namespace = cluster["metadata"]["namespace"]
    return [
        f"{name}-server-{node}.{name}-nodes.{namespace}"
        for node in range(cluster["spec"]["replicas"])
    ]


def broker_url_list() -> str:
    url: str = manifests()["Secret"]["stringData"]["broker-url"]
    return url


def test_rabbitmq_is_an_operator_cluster_of_three_nodes_with_the_plugins_triows_uses() -> None:
    cluster = rabbitmq_cluster()
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    assert cluster["spec"]["replicas"] >= 3
    assert set(cluster["spec"]["rabbitmq"]["additionalPlugins"]) >= PLUGINS_TRIOWS_USES
    # Its namespace comes with it.
    assert manifests()["Namespace"]["metadata"]["name"] == cluster["metadata"]["namespace"]


def test_the_broker_url_list_names_every_node_of_the_cluster_in_order() -> None:
    addresses = parse_broker_urls(broker_url_list(), AMQP091_SCHEMES)
    assert [address.host for address in addresses] == node_host_names(rabbitmq_cluster())
    assert {address.port for address in addresses} == {OPERATOR_AMQP_PORT}
    assert {address.vhost for address in addresses} == {"/"}
    # And the backend the ConfigMap names accepts the list at start-up.
    check_backend_settings(
        Settings.from_env(
            {
                **configmap_settings(),
                "TRIOWS_SECRET": manifests()["Secret"]["stringData"]["secret"],
                "TRIOWS_BROKER_URL": broker_url_list(),
            }
        )
    )


def test_the_broker_credentials_are_in_the_secret_and_nowhere_in_the_configmap() -> None:
    addresses = parse_broker_urls(broker_url_list(), AMQP091_SCHEMES)
    assert all(address.user and address.password for address in addresses)
    configmap_text = yaml.safe_dump(manifests()["ConfigMap"])
    for address in addresses:
        assert address.host not in configmap_text
        assert f"{address.user}:{address.password}@" not in configmap_text
    # The Deployment reads the list from the Secret (and only from there).
    (broker_url,) = [
        variable
        for variable in deployment_container()["env"]
        if variable["name"] == "TRIOWS_BROKER_URL"
    ]
    reference = broker_url["valueFrom"]["secretKeyRef"]
    assert reference == {"name": manifests()["Secret"]["metadata"]["name"], "key": "broker-url"}


# --- Containerfile ----------------------------------------------------------------


def test_the_container_image_binds_and_exposes_the_port_the_manifests_use() -> None:
    instructions = containerfile()
    env = " ".join(instructions["ENV"])
    bind = re.search(r"TRIOWS_BIND=(\S+)", env)
    assert bind is not None
    port = bind_port(bind.group(1))
    assert instructions["EXPOSE"] == [str(port)]
    assert port == container_port("http") == bind_port(configmap_settings()["TRIOWS_BIND"])
    assert "/healthz" in " ".join(instructions["HEALTHCHECK"])
    assert instructions["CMD"] == ['["triows", "serve"]']
    assert instructions["STOPSIGNAL"] == ["SIGTERM"]


def test_the_image_runs_as_the_non_root_user_the_pod_requires() -> None:
    (user,) = containerfile()["USER"]
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # runAsNonRoot can only verify a numeric USER.
    assert user.isdigit() and int(user) != 0
    assert pod["securityContext"]["runAsUser"] == int(user)


# --- HAProxy ------------------------------------------------------------------------


def haproxy_lines() -> list[str]:
    return [
        line.strip()
        for line in HAPROXY_CONFIG.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_haproxy_health_checks_readyz_on_every_server() -> None:
    lines = haproxy_lines()
    assert "option httpchk" in lines
    assert "http-check send meth GET uri /readyz" in lines
    assert "http-check expect status 200" in lines
    servers = [line for line in lines if line.startswith("server ")]
    assert len(servers) == len(DEFAULT_INSTANCE_PORTS)
    assert all(line.split()[-1] == "check" for line in servers)


def test_haproxy_defaults_are_the_cluster_ports_and_websockets_get_a_long_tunnel_timeout() -> None:
    lines = haproxy_lines()
    defaults = dict(line.split()[1:3] for line in lines if line.startswith("presetenv "))
    assert bind_port(defaults["TRIOWS_HAPROXY_BIND"]) == DEFAULT_FRONT_PORT
    instances = [defaults[f"TRIOWS_INSTANCE_{letter}"] for letter in "ABC"]
    assert [bind_port(address) for address in instances] == list(DEFAULT_INSTANCE_PORTS)
    (tunnel,) = [line.split()[2] for line in lines if line.startswith("timeout tunnel ")]
    assert tunnel == "1h"


def test_haproxy_accepts_its_config_without_warnings() -> None:
    result = subprocess.run(
        [debian_executable("haproxy"), "-c", "-f", str(HAPROXY_CONFIG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


# --- nginx --------------------------------------------------------------------------


def nginx_text() -> str:
    return "\n".join(
        line.split("#", 1)[0] for line in (DEPLOY / "nginx.conf").read_text().splitlines()
    )


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match is not None, value
    return int(match.group(1)) * units[match.group(2) or "s"]


def test_nginx_passes_the_websocket_upgrade_on() -> None:
    text = nginx_text()
    assert re.search(r"map \$http_upgrade \$connection_upgrade\s*\{", text)
    assert re.search(r"proxy_http_version 1\.1;", text)
    assert re.search(r"proxy_set_header Upgrade \$http_upgrade;", text)
    assert re.search(r"proxy_set_header Connection \$connection_upgrade;", text)


@pytest.mark.parametrize("directive", ["proxy_read_timeout", "proxy_send_timeout"])
def test_nginx_lets_an_idle_websocket_stay_open(directive: str) -> None:
    (value,) = re.findall(rf"{directive} (\S+);", nginx_text())
    # nginx's default is 60 s; an idle chat socket must outlive that.
    assert seconds(value) >= 3600


def test_nginx_listens_on_the_front_port_and_proxies_to_the_cluster_instances() -> None:
    text = nginx_text()
    (listen,) = re.findall(r"listen (\S+);", text)
    assert bind_port(listen) == DEFAULT_FRONT_PORT
    servers = re.findall(r"server 127\.0\.0\.1:(\d+)", text)
    assert [int(port) for port in servers] == list(DEFAULT_INSTANCE_PORTS)


def test_nginx_accepts_its_config() -> None:
    result = subprocess.run(
        [debian_executable("nginx", "nginx-light"), "-t", "-c", str(DEPLOY / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


async def test_nginx_with_this_config_carries_websockets_and_sends_to_real_instances(
    tmp_path: Path,
) -> None:
    target = TARGETS_BY_NAME["amqp091-rabbitmq"]
    await require_broker(target.broker)
    front = free_port()
    async with ready_instances(target, len(DEFAULT_INSTANCE_PORTS)) as instances:
        # The file as it stands, with only its addresses and pid path moved to free ones.
        config = (DEPLOY / "nginx.conf").read_text()
        config = config.replace(
            f"listen 127.0.0.1:{DEFAULT_FRONT_PORT};", f"listen 127.0.0.1:{front};"
        )
        for port, instance in zip(DEFAULT_INSTANCE_PORTS, instances, strict=True):
            config = config.replace(f"server 127.0.0.1:{port} ", f"server {instance.base_url[7:]} ")
        config = config.replace("pid /tmp/triows-nginx.pid;", f"pid {tmp_path / 'nginx.pid'};")
        (tmp_path / "nginx.conf").write_text(config)
        command = [debian_executable("nginx", "nginx-light"), "-c", str(tmp_path / "nginx.conf")]
        async with trio.open_nursery() as nursery:
            nginx: trio.Process = await nursery.start(
                partial(trio.run_process, [*command, "-g", "daemon off;"], check=False)
            )
            try:
                url = f"http://127.0.0.1:{front}"
                await wait_for_status(f"{url}/readyz", 200)
                # A hang guard over the whole exchange, connecting included.
                with trio.fail_after(STEP_TIMEOUT):
                    async with open_client(url, user="Bob") as bob, httpx.AsyncClient() as http:
                        response = await post_send(http, url, "Bob", "via nginx", sender="Anne")
                        assert response.status_code == 202, response.text
                        async for frame in bob:
                            if frame["type"] == "message":
                                break
                        assert frame["message"] == "via nginx"
                        ack = await bob.send(to="Bob", message="over the socket")
                        assert ack["status"] == "routed"
            finally:
                with trio.CancelScope(shield=True):
                    await stop_process(nginx)
