"""docker-compose.yml's variables, the WorkloadEntry template, and the README.

The subnet and every static address are Compose variables with defaults in
198.18.0.0/24; the control plane renders examples/compose-mesh/workloads.yaml.tmpl
with the same variables, so addresses agree whatever the user sets.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshpilot.demo import render
from tests.unit.compose_files import (
    COMPOSE_FILE,
    CUSTOM_ENV,
    DEFAULT_SUBNET,
    MESH_DIR,
    README,
    compose,
    control_plane,
    of_kind,
    rendered_files,
    services,
    use_env,
    variables,
)


@pytest.fixture(autouse=True)
def default_env() -> Iterator[None]:
    use_env({})
    yield
    use_env({})


# --- variables, the template and the README -------------------------------------------


def test_every_variable_has_one_default_inside_the_default_subnet() -> None:
    found = variables()
    assert set(found) == set(CUSTOM_ENV), "CUSTOM_ENV must exercise every variable"
    for name, defaults in found.items():
        assert len(defaults) == 1, f"{name} has different defaults: {sorted(defaults)}"
    default = {name: next(iter(d)) for name, d in found.items()}
    subnet = ipaddress.ip_network(default["MESH_SUBNET"])
    assert str(subnet) == DEFAULT_SUBNET
    for name, value in default.items():
        if name != "MESH_SUBNET":
            assert ipaddress.ip_address(value) in subnet, f"{name}={value}"


def test_template_variables_are_all_given_to_the_control_plane() -> None:
    name, _, (template, _) = control_plane()
    source = MESH_DIR / Path(template).name
    wanted = set(render.string.Template(source.read_text()).get_identifiers())
    given = set(services()[name].get("environment") or {})
    assert wanted and wanted <= given, f"{template} needs {sorted(wanted - given)}"
    for path in MESH_DIR.glob("*.y*ml"):
        assert "${" not in path.read_text(), f"{path.name} is read as is: no ${{...}} there"


def test_nothing_points_at_the_default_subnet_once_the_variables_are_set() -> None:
    use_env(CUSTOM_ENV)
    # Parsed documents, not text: comments may well mention the default subnet.
    docs = [compose(), *(d for t in rendered_files().values() for d in yaml.safe_load_all(t))]
    stale = [m.group(0) for m in re.finditer(r"198\.18\.[\d./]+", json.dumps(docs))]
    assert stale == [], stale
    addresses = {we.spec.address for we in of_kind("WorkloadEntry").values()}
    assert addresses == {
        v for k, v in CUSTOM_ENV.items() if k.endswith("_V1_IP") or k.endswith("_V2_IP")
    }


def test_render_names_the_template_line_and_missing_variable(tmp_path: Path) -> None:
    template = tmp_path / "workloads.yaml.tmpl"
    template.write_text("kind: WorkloadEntry\nspec:\n  address: ${REVIEWS_V9_IP}\n")
    out = tmp_path / "mesh" / "workloads.yaml"
    with pytest.raises(
        render.RenderError, match=r"workloads.yaml.tmpl line 3: \$\{REVIEWS_V9_IP\}"
    ):
        render.render(template.read_text(), {}, str(template))
    assert render.main([str(template), str(out)]) == 1
    assert not out.exists()
    ok = render.render(template.read_text(), {"REVIEWS_V9_IP": "10.0.0.9"}, "t")
    assert "address: 10.0.0.9" in ok
    with pytest.raises(render.RenderError, match=r"t line 2: .*write \$\$ for a literal"):
        render.render("a: 1\nb: costs 5 $ each\n", {}, "t")
    assert render.render("b: costs $$5\n", {}, "t") == "b: costs $5\n"


def _commands(lines: list[str]) -> list[str]:
    """`docker compose ...` and `curl ...` lines, without their trailing comments."""
    out = []
    for line in lines:
        line = line.split("  #")[0].strip()
        if line.startswith(("docker compose", "curl ")):
            out.append(line)
    return out


def test_readme_and_compose_header_give_the_same_commands_and_config() -> None:
    header = []
    for line in COMPOSE_FILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("#").strip())
    readme = README.read_text()
    section = readme[readme.index("## The demo mesh in containers") :]
    section = section[: section.index("\n## ", 1)]
    from_header = _commands(header)
    assert from_header, "the compose file header shows how to run it"
    # The multi-line custom-subnet example ends in `docker compose up` too: compare the
    # first usage block only.
    assert _commands(section.splitlines()) == from_header[: len(_commands(section.splitlines()))]
    assert set(_commands(section.splitlines())) == set(from_header[:4])
    for url in re.findall(r"http://[^\s`]+", " ".join(from_header)):
        assert url in section, url
    for words in ("examples/compose-mesh/", "workloads.yaml.tmpl", DEFAULT_SUBNET):
        assert words in " ".join(header) and words in section, words
    for variable in ("MESH_SUBNET", "MESH_GATEWAY"):
        assert variable in section and variable in " ".join(header), variable
