"""parse_text: documents to Configs, and errors that say where."""

from __future__ import annotations

import json
import textwrap

import pytest

from meshpilot.api.networking import DestinationRuleSpec, VirtualServiceSpec
from meshpilot.api.parse import MAX_DOCUMENT_DEPTH, parse_object, parse_text
from meshpilot.config import ConfigKey


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


VS = y(
    """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata:
      name: reviews
      namespace: bookinfo
      labels: {app: reviews}
      annotations: {note: "x"}
      creationTimestamp: "2024-01-02T03:04:05Z"
    spec:
      hosts: [reviews]
      http:
      - timeout: 1.5s
        route:
        - destination: {host: reviews, subset: v1}
          weight: 80
        - destination: {host: reviews, subset: v2}
          weight: 20
    """
)


def test_valid_object_is_typed_and_keyed() -> None:
    result = parse_text(VS, "vs.yaml")
    assert result.errors == []
    [cfg] = result.configs
    assert cfg.key == ConfigKey("VirtualService", "bookinfo", "reviews")
    assert isinstance(cfg.spec, VirtualServiceSpec)
    assert cfg.spec.http[0].timeout == 1.5
    assert [r.weight for r in cfg.spec.http[0].route] == [80, 20]
    assert cfg.labels == {"app": "reviews"}
    assert cfg.annotations == {"note": "x"}
    assert cfg.creation_timestamp is not None and cfg.creation_timestamp.year == 2024
    assert cfg.origin == "vs.yaml#1"
    assert cfg.revision


def test_namespace_defaults_to_default() -> None:
    text = VS.replace("  namespace: bookinfo\n", "")
    [cfg] = parse_text(text, "f").configs
    assert cfg.namespace == "default"


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_networking_versions_accepted(version: str) -> None:
    text = VS.replace("networking.istio.io/v1", f"networking.istio.io/{version}")
    result = parse_text(text, "f")
    assert result.errors == [] and len(result.configs) == 1


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_security_versions_accepted(version: str) -> None:
    text = y(
        f"""
        apiVersion: security.istio.io/{version}
        kind: PeerAuthentication
        metadata: {{name: default, namespace: istio-system}}
        spec: {{mtls: {{mode: STRICT}}}}
        """
    )
    result = parse_text(text, "f")
    assert result.errors == [] and result.configs[0].spec.mtls.mode == "STRICT"


def test_revision_is_content_hash() -> None:
    a = parse_text(VS, "a.yaml").configs[0]
    b = parse_text(VS, "b.yaml").configs[0]
    c = parse_text(VS.replace("weight: 80", "weight: 79"), "a.yaml").configs[0]
    assert a.revision == b.revision
    assert a.revision != c.revision


def test_multi_document_with_blank_and_ignored_documents() -> None:
    text = (
        VS
        + "---\n---\n# just a comment\n---\n"
        + y(
            """
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: reviews}
        spec: {replicas: 1}
        """
        )
    )
    result = parse_text(text, "f")
    assert len(result.configs) == 1
    assert result.ignored == 1
    assert result.errors == []


def test_kind_list_is_unwrapped() -> None:
    item = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "r"},
        "spec": {"host": "r"},
    }
    text = json.dumps({"apiVersion": "v1", "kind": "List", "items": [item, item | {"x": 1}]})
    result = parse_text(text, "list.json")
    assert len(result.configs) == 2
    assert isinstance(result.configs[0].spec, DestinationRuleSpec)


def test_error_carries_document_object_and_field() -> None:
    text = VS + "---\n" + VS.replace("name: reviews", "name: other").replace("1.5s", "fast")
    result = parse_text(text, "vs.yaml")
    assert len(result.configs) == 1
    [err] = result.errors
    assert (err.origin, err.document, err.kind, err.namespace, err.name) == (
        "vs.yaml",
        2,
        "VirtualService",
        "bookinfo",
        "other",
    )
    assert err.field == "spec.http[0].timeout"
    assert "invalid duration" in err.message
    assert str(err).startswith(
        "vs.yaml document 2 (VirtualService bookinfo/other): spec.http[0].timeout: "
    )


def test_yaml_syntax_error_names_line() -> None:
    result = parse_text("a: 1\nb: [1, 2\nc: 3\n", "bad.yaml")
    [err] = result.errors
    assert err.document is None
    assert "invalid YAML at line" in err.message
    assert result.configs == []


def test_multiple_validation_errors_are_counted() -> None:
    text = y(
        """
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: se}
        spec:
          hosts: [a]
          ports: [{number: 0}, {number: 70000}]
        """
    )
    [err] = parse_text(text, "f").errors
    assert err.field == "spec.ports[0].number"
    assert "(and 1 more)" in err.message


def test_parse_object_without_index_keeps_plain_origin() -> None:
    doc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {}}
    cfg = parse_object(doc, "kube://default/s")
    assert not isinstance(cfg, Exception)
    assert getattr(cfg, "origin", None) == "kube://default/s"


def test_depth_limit() -> None:
    deep = "{a: " * (MAX_DOCUMENT_DEPTH + 5) + "1" + "}" * (MAX_DOCUMENT_DEPTH + 5)
    text = f"apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {deep}\n"
    [err] = parse_text(text, "f").errors
    assert "nested deeper" in err.message
    shallow = "{a: " * 20 + "1" + "}" * 20
    text = f"apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {{x: {shallow}}}\n"
    assert parse_text(text, "f").errors == []


def test_destination_rule_checks_subset_names_and_mutual_tls_files() -> None:
    bad_subset = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r}
spec: {host: reviews, subsets: [{name: V_1, labels: {version: v1}}]}
"""
    [err] = parse_text(bad_subset, "dr.yaml").errors
    assert err.field == "spec.subsets[0].name"
    mutual = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r}
spec: {host: reviews, trafficPolicy: {tls: {mode: MUTUAL, caCertificates: /ca.pem}}}
"""
    [err] = parse_text(mutual, "dr.yaml").errors
    assert err.field == "spec.trafficPolicy.tls"
    assert "clientCertificate and privateKey" in err.message


def test_json_is_parsed_as_json_and_errors_say_line_and_column() -> None:
    good = json.dumps({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule"})
    good = good[:-1] + ', "metadata": {"name": "r"}, "spec": {"host": "r"}}'
    assert len(parse_text(good, "r.json", syntax="json").configs) == 1
    # A trailing comma is fine in YAML's flow style, not in JSON.
    broken = '{"apiVersion": "v1",\n "kind": "Service",\n "metadata": {"name": "s",}}\n'
    [err] = parse_text(broken, "s.json", syntax="json").errors
    assert err.origin == "s.json" and err.document is None
    assert err.message.startswith("invalid JSON at line 3, column 27: Expecting property name")


def test_json_nested_too_deeply_is_an_error() -> None:
    [err] = parse_text("[" * 100_000 + "]" * 100_000, "deep.json", syntax="json").errors
    assert err.message == "invalid JSON: nested too deeply"


def test_json_top_level_must_be_an_object() -> None:
    [err] = parse_text("[1, 2]", "list.json", syntax="json").errors
    assert err.document == 1 and "expected a mapping, got list" in err.message
