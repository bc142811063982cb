"""``fleet k8s-job``: the fleet as Kubernetes Indexed Jobs, one per wave, one index per database.

For Cloud Native GitLab, beside the chart's own migrations Job. Kubernetes decides what
is retried from the exit code: ``podFailurePolicy`` counts the toolkit's resumable codes
(4, 6, 7, 75) against ``backoffLimitPerIndex`` (the index runs again and resumes) and fails
the index outright on any other (``FailIndex``: a refusal, a failed verify, a bug is not
cured by running again); a pod evicted or preempted (``DisruptionTarget``) is not
counted. An Indexed Job has no waves, so each wave is its own Job: the canary's first,
and the next applied once ``kubectl wait --for=condition=complete`` says it is done.

Each pod runs ``toolkit fleet job --wave W`` (its ``--index`` read from the
``JOB_COMPLETION_INDEX`` the Job controller sets) on the inventory mounted from a
ConfigMap. The databases' URLs come from a Secret as environment variables (the
inventory's ``url_env`` names), and the password, when the URLs hold none, the way
GitLab's chart keeps it: the Secret and key of ``global.psql.password`` (``secret``,
``key``), as ``PGPASSWORD``, which libpq reads.
"""

from __future__ import annotations

from typing import Any

import yaml

from toolkit.fleet import record
from toolkit.fleet.inventory import Fleet, Wave

CONTAINER = "toolkit"
MOUNT = "/etc/toolkit-fleet"


def manifests(fleet: Fleet, inventory_text: str, action: str, milestone: str, *, image: str,
              name: str = "toolkit-fleet", namespace: str | None = None,
              urls_secret: str | None = "toolkit-fleet-urls", password_secret: tuple[str, str] | None = None,
              backoff_limit_per_index: int = 2, extra: tuple[str, ...] = (),
              waves: list[str] | None = None) -> list[dict[str, Any]]:
    """The ConfigMap holding the inventory, then one Indexed Job per wave, in run order."""
    meta = {"namespace": namespace} if namespace else {}
    labels = {"app.kubernetes.io/name": "toolkit-fleet", "app.kubernetes.io/instance": name}
    docs: list[dict[str, Any]] = [{
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{name}-inventory", **meta, "labels": dict(labels)},
        "data": {"fleet.yml": inventory_text},
    }]
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}]
    if password_secret:
        env.append({"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {
            "name": password_secret[0], "key": password_secret[1]}}})
    step = ["rollback", milestone] if action == "rollback" else [milestone]
    for wave in fleet.waves:
        if waves and wave.name not in waves:
            continue
        members = fleet.in_wave(wave.name)
        job_name = f"{name}-{'rollback-' if action == 'rollback' else ''}{milestone}-{wave.name}"[:63]
        container = _container(image, wave.name, step, extra, env, urls_secret)
        docs.append(_indexed_job(job_name.rstrip("-"), wave, [d.name for d in members], meta,
                                 {**labels, "toolkit.fleet/wave": wave.name}, container,
                                 inventory=f"{name}-inventory",
                                 backoff_limit_per_index=backoff_limit_per_index))
    return docs


def _container(image: str, wave: str, step: list[str], extra: tuple[str, ...], env: list[dict[str, Any]],
               urls_secret: str | None) -> dict[str, Any]:
    """The pod's one container: ``toolkit fleet job`` on the mounted inventory, as a
    non-root user on a read-only root filesystem, the URLs from the Secret."""
    container: dict[str, Any] = {
        "name": CONTAINER, "image": image,
        "command": ["toolkit", "fleet", "job", "--inventory", f"{MOUNT}/fleet.yml", "--wave", wave,
                    "--out", "/tmp/fleet-artifacts", *step,
                    *(["--", *extra] if extra else [])],
        "env": [dict(e) for e in env],
        "volumeMounts": [{"name": "inventory", "mountPath": MOUNT, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
    }
    if urls_secret:
        container["envFrom"] = [{"secretRef": {"name": urls_secret, "optional": True}}]
    return container


def _indexed_job(job_name: str, wave: Wave, databases: list[str], meta: dict[str, Any],
                 pod_labels: dict[str, str], container: dict[str, Any], *, inventory: str,
                 backoff_limit_per_index: int) -> dict[str, Any]:
    """One wave's Indexed Job: an index per database, as many at once as the wave allows,
    retried per index on the toolkit's resumable exit codes only."""
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name, **meta, "labels": dict(pod_labels),
                     "annotations": {"toolkit.fleet/databases": ",".join(databases)}},
        "spec": {
            "completionMode": "Indexed",
            "completions": len(databases),
            "parallelism": min(wave.max_parallel, len(databases)),
            "backoffLimitPerIndex": backoff_limit_per_index,
            # a stopping wave stops at its first failed database; one that continues runs them all
            "maxFailedIndexes": 0 if wave.on_error == "stop" else len(databases),
            "podFailurePolicy": {"rules": [
                {"action": "FailIndex", "onExitCodes": {"containerName": CONTAINER, "operator": "NotIn",
                                                        "values": [0, *record.RESUMABLE]}},
                {"action": "Count", "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                                    "values": list(record.RESUMABLE)}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {"restartPolicy": "Never", "containers": [container],
                         "volumes": [{"name": "inventory", "configMap": {"name": inventory}},
                                     {"name": "tmp", "emptyDir": {}}]},
            },
        },
    }


def render(docs: list[dict[str, Any]], header: str) -> str:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump_all(docs, sort_keys=False, width=1000)
