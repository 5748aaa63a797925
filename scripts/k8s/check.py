#!/usr/bin/env python3
"""Checks the Kubernetes manifests in a folder (default: this one) against the parts of the
batch/v1 Job schema they use, offline: every document parses as YAML (PyYAML), is a Job of
batch/v1 with a DNS-1123 name (PASS replaced as run-fit.sh does), known keys only at the
levels it sets, integer counts, restartPolicy Never or OnFailure, containers with a name, an
image and a command of strings, env values that are strings, volume mounts that name a
volume of the pod, and, for an Indexed Job, completions and parallelism set and a command
that reads JOB_COMPLETION_INDEX. Prints `FILE: ok` per file; exits 1 naming each problem.
Used by tests/it/shards.rs (scheduler_templates_parse)."""
import pathlib
import re
import sys

import yaml

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
JOB_SPEC = {"completionMode", "completions", "parallelism", "backoffLimit",
            "backoffLimitPerIndex", "activeDeadlineSeconds", "ttlSecondsAfterFinished",
            "template", "podFailurePolicy", "suspend"}
POD_SPEC = {"restartPolicy", "containers", "volumes", "nodeSelector", "tolerations",
            "serviceAccountName", "securityContext"}
CONTAINER = {"name", "image", "command", "args", "env", "resources", "volumeMounts",
             "workingDir", "imagePullPolicy"}


def check(doc, where):
    errs = []
    def need(cond, msg):
        if not cond:
            errs.append(f"{where}: {msg}")
    need(isinstance(doc, dict), "not a mapping")
    if errs:
        return errs
    need(doc.get("apiVersion") == "batch/v1", "apiVersion must be batch/v1")
    need(doc.get("kind") == "Job", "kind must be Job")
    name = str(doc.get("metadata", {}).get("name", "")).replace("PASS", "covariance")
    need(DNS1123.match(name) is not None and len(name) <= 63, f"bad metadata.name {name!r}")
    spec = doc.get("spec", {})
    need(set(spec) <= JOB_SPEC, f"unknown spec keys {sorted(set(spec) - JOB_SPEC)}")
    for k in ("completions", "parallelism", "backoffLimit"):
        need(k not in spec or (isinstance(spec[k], int) and spec[k] >= 0), f"spec.{k} must be a count")
    pod = spec.get("template", {}).get("spec", {})
    need(set(pod) <= POD_SPEC, f"unknown pod spec keys {sorted(set(pod) - POD_SPEC)}")
    need(pod.get("restartPolicy") in ("Never", "OnFailure"), "restartPolicy must be Never or OnFailure")
    volumes = {v.get("name") for v in pod.get("volumes", [])}
    for v in pod.get("volumes", []):
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        need(isinstance(claim, str) and claim, f"volume {v.get('name')}: no claimName")
    containers = pod.get("containers", [])
    need(isinstance(containers, list) and containers, "no containers")
    commands = []
    for c in containers:
        need(set(c) <= CONTAINER, f"unknown container keys {sorted(set(c) - CONTAINER)}")
        need(isinstance(c.get("name"), str) and DNS1123.match(c["name"]), "container name")
        need(isinstance(c.get("image"), str) and c["image"], "container image")
        cmd = c.get("command", [])
        need(isinstance(cmd, list) and cmd and all(isinstance(x, str) for x in cmd),
             "command must be a list of strings")
        commands.append(" ".join(map(str, cmd)))
        for e in c.get("env", []):
            need(isinstance(e.get("value"), str), f"env {e.get('name')}: value must be a string")
        for m in c.get("volumeMounts", []):
            need(m.get("name") in volumes, f"volumeMount {m.get('name')} names no volume")
            need(str(m.get("mountPath", "")).startswith("/"), "mountPath must be absolute")
    if spec.get("completionMode") == "Indexed":
        need("completions" in spec and "parallelism" in spec,
             "an Indexed Job needs completions and parallelism")
        need(any("JOB_COMPLETION_INDEX" in c for c in commands),
             "an Indexed Job's command should read JOB_COMPLETION_INDEX")
    return errs


def main():
    folder = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent)
    problems = []
    files = sorted(folder.glob("*.yaml"))
    if not files:
        problems.append(f"{folder}: no manifests")
    for f in files:
        try:
            docs = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        except yaml.YAMLError as e:
            problems.append(f"{f.name}: not YAML: {e}")
            continue
        errs = [e for i, d in enumerate(docs) for e in check(d, f"{f.name}[{i}]")]
        if not docs:
            errs.append(f"{f.name}: empty")
        problems.extend(errs)
        if not errs:
            print(f"{f.name}: ok")
    for p in problems:
        print(p, file=sys.stderr)
    sys.exit(1 if problems else 0)


main()
