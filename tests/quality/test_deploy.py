"""deploy/ stays true to the relay: valid manifests, rules and dashboard on real metrics."""

from __future__ import annotations

import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import promql_parser
import pytest
import yaml

from outbox_relay.cli import cli
from outbox_relay.metrics import RelayMetrics, RelayStats

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES_VERSION = "1.30.0"
_METRIC = re.compile(r"\boutbox_relay_\w+")


def exported_metric_names() -> set[str]:
    metrics = RelayMetrics(RelayStats(), relay_id="test", stream="s", schema="noetl")
    metrics.batch_rows.observe(1)
    metrics.publish_seconds.observe(0.01)
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "outbox-relay.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_metric_names_follow_prometheus_conventions() -> None:
    for name in exported_metric_names():
        assert re.fullmatch(r"outbox_relay_[a-z0-9_]+", name), name
        if name.endswith("_total"):
            continue
        # Units in the name, base units only.
        assert not re.search(r"_(milliseconds|ms|bytes_total|percent)$", name), name


@pytest.mark.parametrize(
    "expression",
    [rule["expr"] for rule in alert_rules()] + dashboard_expressions(),
)
def test_every_expression_parses_and_uses_only_exported_metrics(expression: str) -> None:
    promql_parser.parse(expression)  # raises on a syntax error
    used = set(_METRIC.findall(expression))
    assert used, f"no outbox-relay metric in {expression!r}"
    assert used <= exported_metric_names(), used - exported_metric_names()


def test_the_alerts_cover_lag_growth_dead_letters_and_a_relay_down() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {"OutboxLagHigh", "OutboxPendingGrowing", "OutboxDeadLetters", "OutboxRelayDown"} <= (
        names
    )
    for rule in alert_rules():
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}


def kubernetes_resources() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    return [
        (name, document)
        for name in kustomization["resources"]
        for document in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text())
    ]


def test_every_manifest_file_is_in_the_kustomization() -> None:
    listed = {name for name, _ in kubernetes_resources()}
    on_disk = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize(("name", "resource"), kubernetes_resources())
def test_kubernetes_manifests_validate_against_the_api_schema(
    name: str, resource: dict[str, Any]
) -> None:
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_the_deployment_probes_the_relay_and_runs_several_replicas() -> None:
    (deployment,) = [r for _, r in kubernetes_resources() if r["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    (container,) = spec["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    config = next(r for _, r in kubernetes_resources() if r["kind"] == "ConfigMap")
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert str(port) == config["data"]["OUTBOX_METRICS_PORT"]
    assert any(r["kind"] == "PodDisruptionBudget" for _, r in kubernetes_resources())


def test_every_relay_pod_migrates_before_it_relays() -> None:
    """A Job applied with the Deployment enforced no order, and a Job's template cannot
    change, so the next release's apply failed while the old Job existed."""
    resources = [r for _, r in kubernetes_resources()]
    assert not any(r["kind"] == "Job" for r in resources)
    deployment = next(r for r in resources if r["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (migrate,) = pod["initContainers"]
    (relay,) = pod["containers"]
    assert migrate["args"] == ["migrate"]
    assert migrate["image"] == relay["image"]
    secrets = {ref["secretRef"]["name"] for ref in migrate["envFrom"] if "secretRef" in ref}
    assert secrets == {"outbox-relay-migrate"}  # the owner's URL, for this container only
    assert all(
        ref.get("secretRef", {}).get("name") != "outbox-relay-migrate" for ref in relay["envFrom"]
    )


def test_the_image_is_the_release() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    assert image["newTag"] == version("outbox-relay")
    deployment = next(r for _, r in kubernetes_resources() if r["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
        f"{image['name']}:"
    )


# What the ConfigMap sets on purpose for a cluster; every other key says the default.
CLUSTER_CHOICES = {"OUTBOX_NATS_URL", "OUTBOX_LOG_FORMAT"}


def test_the_configmap_says_the_defaults_but_where_it_chooses() -> None:
    """It said OUTBOX_BATCH_SIZE 500 long after the default became 2,000."""
    (config_map,) = (r for _, r in kubernetes_resources() if r["kind"] == "ConfigMap")
    defaults = {
        param.envvar: param.default
        for command in [cli, *cli.commands.values()]
        for param in command.params
        if isinstance(param, click.Option) and isinstance(param.envvar, str)
    }
    for key, value in config_map["data"].items():
        assert key in defaults, f"{key} is no outbox-relay option"
        if key not in CLUSTER_CHOICES:
            assert str(value) == str(defaults[key]), f"{key}: {value} (default {defaults[key]})"
