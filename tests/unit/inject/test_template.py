"""The injection template: the shipped file, overrides, and the limits of substitution."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpilot.inject.patch import ProxySettings, injection_patch
from meshpilot.inject.template import MAX_TEMPLATE_BYTES, VARIABLES, Template, TemplateError

from ._helpers import apply, deployment_pod, validate_pod

SMALL = """\
metadata:
  labels:
    mesh.example/injected-by: custom
spec:
  containers:
    - name: istio-proxy
      image: ${image}
      args: ["--ns=${namespace}", "--uid", "${proxy_uid}", "$(POD_NAME)", "${label_args}"]
      securityContext:
        runAsUser: ${proxy_uid}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    return path


def test_shipped_template_is_package_data_and_renders() -> None:
    rendered = Template.load().render(VARIABLES)
    assert [c["name"] for c in rendered.init_containers] == ["istio-init"]
    assert [c["name"] for c in rendered.containers] == ["istio-proxy"]


def test_override_file_replaces_the_shipped_template(tmp_path: Path) -> None:
    template = Template.load(write(tmp_path, SMALL))
    pod = deployment_pod()
    out = apply(pod, injection_patch(pod, "bookinfo", template, ProxySettings(image="img:1")))
    validate_pod(out)
    assert "initContainers" not in out["spec"]
    proxy = out["spec"]["containers"][1]
    assert proxy["image"] == "img:1"
    # Typed where the value stands alone, text in args, Kubernetes' $(VAR) untouched,
    # a list variable spliced into the list.
    assert proxy["securityContext"]["runAsUser"] == 1337
    assert proxy["args"][:4] == ["--ns=bookinfo", "--uid", "1337", "$(POD_NAME)"]
    assert proxy["args"][4:6] == ["--label", "app=reviews"]
    assert out["metadata"]["labels"]["mesh.example/injected-by"] == "custom"


def test_a_label_value_cannot_change_the_templates_structure() -> None:
    template = Template.load()
    pod = deployment_pod()
    hostile = 'x"\n  privileged: true\n- name: evil'
    pod["metadata"]["labels"]["app"] = hostile
    out = apply(pod, injection_patch(pod, "bookinfo", template, ProxySettings()))
    # The value arrives as one string, where the template put it, and nowhere else.
    assert out["metadata"]["labels"]["service.istio.io/canonical-name"] == hostile
    assert [c["name"] for c in out["spec"]["containers"]] == ["reviews", "istio-proxy"]
    assert out["spec"]["containers"][1]["securityContext"]["privileged"] is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spec:\n  containers:\n    - name: p\n      image: ${imgae}\n",
         r"sidecar.yaml: spec.containers\[0\].image: unknown variable \$\{imgae\}"),
        ("spec:\n  hostNetwork: true\n", r"spec.hostNetwork: unknown field"),
        ("metadata:\n  name: x\n", r"metadata.name: unknown field"),
        ("kind: Pod\n", r"kind: unknown field"),
        ("spec:\n  containers:\n    - image: x\n",
         r"spec.containers\[0\]: expected a mapping with a name"),
        ("spec:\n  volumes:\n    - {name: a}\n    - {name: a}\n", r"duplicate name 'a'"),
        ("spec:\n  containers: {name: x}\n", r"spec.containers: expected a list"),
        ("spec:\n  containers:\n    - name: p\n      image: a-${label_args}\n",
         r"the list \$\{label_args\} cannot be part of a string"),
        ("spec: [\n", r"not valid YAML"),
        ("- a\n", r"expected a mapping at the top"),
    ],
)  # fmt: skip
def test_bad_templates_fail_at_load_naming_file_and_field(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(TemplateError, match=message) as info:
        Template.load(write(tmp_path, text))
    assert str(tmp_path / "sidecar.yaml") in str(info.value)


def test_missing_and_oversized_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot read"):
        Template.load(tmp_path / "absent.yaml")
    big = write(tmp_path, "# " + "x" * MAX_TEMPLATE_BYTES + "\n")
    with pytest.raises(TemplateError, match=f"larger than {MAX_TEMPLATE_BYTES} bytes"):
        Template.load(big)
