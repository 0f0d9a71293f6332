"""Client of Istio's CSR API (`istio.v1.auth.IstioCertificateService`) over TLS.

The first certificate is requested with the bearer token from `--token-file`, read
again at every request because tokens rotate. A renewal first presents the current
workload certificate as the TLS client certificate (so it keeps working after the
token expired) and falls back to the token if the CA refuses that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import struct_pb2

from meshpilot.agent import logfmt
from meshpilot.protos import istio_ca_pb2, istio_ca_pb2_grpc

log = logfmt.get_logger(__name__)

DEFAULT_CA_ADDRESS = "127.0.0.1:15012"
# The control plane's certificate carries this DNS SAN (as istiod's does).
CONTROL_PLANE_SAN = "istiod.istio-system.svc"
REQUEST_TIMEOUT = 10.0
# A chain is a few KiB; anything near this is not a certificate answer.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024


class CAError(Exception):
    """The CA could not be reached or refused the CSR; the message never holds secrets."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """The current workload certificate, presented as TLS client certificate on renewal."""

    key_pem: bytes
    chain_pem: bytes


class CAClient:
    """Sends CSRs to the CA at `address`, trusting only `root_cert`."""

    def __init__(
        self,
        address: str,
        root_cert: bytes,
        token_file: Path | None,
        *,
        server_name: str = CONTROL_PLANE_SAN,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.address = address
        self.root_cert = root_cert
        self.token_file = token_file
        self.server_name = server_name
        self.timeout = timeout

    async def create_certificate(
        self,
        csr_pem: bytes,
        validity_seconds: int,
        metadata: Mapping[str, str] | None = None,
        *,
        renew_with: ClientIdentity | None = None,
    ) -> list[str]:
        """The signed chain (leaf first); raises CAError."""
        request = istio_ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode("ascii"), validity_duration=max(0, int(validity_seconds))
        )
        meta = struct_pb2.Struct()
        meta.update(dict(metadata or {}))
        request.metadata.CopyFrom(meta)
        if renew_with is not None:
            try:
                return await self._call(request, token=None, identity=renew_with)
            except CAError as e:
                if self.token_file is None:
                    raise
                log.info("renewal with the client certificate refused, trying the token", error=e)
        token = await self._read_token()
        return await self._call(request, token=token, identity=None)

    async def _read_token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            text = await asyncio.to_thread(self.token_file.read_text, encoding="utf-8")
        except OSError as e:
            raise CAError(f"--token-file {self.token_file}: cannot read it: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise CAError(f"--token-file {self.token_file}: not UTF-8 text") from e
        token = text.strip()
        if not token:
            raise CAError(f"--token-file {self.token_file}: the file is empty")
        return token

    async def _call(
        self,
        request: istio_ca_pb2.IstioCertificateRequest,
        *,
        token: str | None,
        identity: ClientIdentity | None,
    ) -> list[str]:
        if identity is None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_cert)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.root_cert,
                private_key=identity.key_pem,
                certificate_chain=identity.chain_pem,
            )
        options = [
            ("grpc.ssl_target_name_override", self.server_name),
            ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
            # One CSR per channel: no background reconnects between rotations.
            ("grpc.enable_retries", 0),
        ]
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        how = "client certificate" if identity is not None else "token"
        async with grpc.aio.secure_channel(self.address, creds, options=options) as channel:
            # grpc_tools writes no annotations into *_pb2_grpc.py.
            stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel)  # type: ignore[no-untyped-call]
            try:
                response = await stub.CreateCertificate(
                    request, metadata=metadata, timeout=self.timeout
                )
            except grpc.aio.AioRpcError as e:
                # details() is the CA's message; it never echoes our token back.
                raise CAError(
                    f"CreateCertificate at {self.address} with {how}: "
                    f"{e.code().name}: {e.details() or ''}".rstrip(": "),
                    e.code(),
                ) from None
        return list(response.cert_chain)
