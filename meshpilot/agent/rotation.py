"""Getting the workload certificate and keeping it fresh.

Like Istio's agent: a new key and CSR for every certificate, renewal at half of the
lifetime with a little jitter (so a fleet started together does not hit the CA in one
burst), retries with capped exponential backoff on CA errors while the old certificate
keeps being served until it expires, and each new certificate pushed over SDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from meshpilot.agent import keys, logfmt, pkiclient
from meshpilot.agent.caclient import CAClient, CAError, ClientIdentity
from meshpilot.agent.pkiclient import PkiHelper
from meshpilot.agent.sds import SecretCache

log = logfmt.get_logger(__name__)

GRACE_RATIO = 0.5
# +-5% of the lifetime around the half: +-10% of the delay before renewal.
JITTER = 0.05
DEFAULT_TTL = 24 * 3600.0
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
# Never renew in a tight loop, even when the CA hands out already half-used certs.
MIN_DELAY = 0.5
# The key helper of a renewal starts this long before it is due (at most half of the
# wait): its interpreter and cryptography are loaded by then.
HELPER_LEAD = 2.0

KEY_FILE = "key.pem"
CHAIN_FILE = "cert-chain.pem"
ROOT_FILE = "root-cert.pem"


def rotation_delay(
    info: keys.CertInfo,
    now: datetime,
    *,
    received: datetime | None = None,
    ratio: float = GRACE_RATIO,
    jitter: float = JITTER,
    rng: random.Random | None = None,
) -> float:
    """Seconds from `now` until renewal: at `ratio` +- `jitter` of the lifetime.

    As Istio's agent does, the lifetime counts from when the agent `received` the
    certificate (default: its notBefore) to notAfter: a CA that backdates notBefore
    for clock skew must not make the agent renew at once, again and again.
    """
    start = received or info.not_before
    lifetime = (info.not_after - start).total_seconds()
    fraction = ratio + (rng or random).uniform(-jitter, jitter)
    at = start + timedelta(seconds=lifetime * fraction)
    return max(MIN_DELAY, (at - now).total_seconds())


def backoff_delays(
    initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX, rng: random.Random | None = None
) -> list[float]:
    """Retry delays: doubling from `initial`, capped at `maximum`, each +-20% jittered."""
    r = rng or random
    out, delay = [], initial
    while delay < maximum:
        out.append(delay * r.uniform(0.8, 1.2))
        delay *= 2
    out.append(maximum * r.uniform(0.8, 1.2))
    return out


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    info: keys.CertInfo
    chain_pem: bytes
    key_pem: bytes
    received: datetime


class CertificateManager:
    """Obtains the workload certificate, serves it through `cache`, renews it."""

    def __init__(
        self,
        *,
        client: CAClient,
        cache: SecretCache,
        workdir: Path,
        identity: str,
        root_cert_file: Path,
        key_type: keys.KeyType = "ec",
        ttl: float = DEFAULT_TTL,
        metadata: Mapping[str, str] | None = None,
        ratio: float = GRACE_RATIO,
        jitter: float = JITTER,
        rng: random.Random | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.client = client
        self.cache = cache
        self.workdir = workdir
        self.identity = identity
        self.root_cert_file = root_cert_file
        self.key_type = key_type
        self.ttl = ttl
        self.metadata = dict(metadata or {})
        self.ratio = ratio
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.current: IssuedCertificate | None = None
        self.first = asyncio.Event()
        self.issued = 0
        self.failures = 0
        self.next_rotation: float | None = None  # time.monotonic() of the next renewal

    async def load_root(self) -> None:
        """Read `--root-cert` (again): it is both the CA's trust and SDS `ROOTCA`."""
        try:
            root = await asyncio.to_thread(self.root_cert_file.read_bytes)
        except OSError as e:
            raise keys.AgentSetupError(
                f"--root-cert {self.root_cert_file}: cannot read it: {e.strerror}"
            ) from e
        if b"-----BEGIN CERTIFICATE-----" not in root:
            raise keys.AgentSetupError(f"--root-cert {self.root_cert_file}: no PEM certificate")
        self.client.root_cert = root
        if self.cache.set_root(root) is not None:
            await asyncio.to_thread(keys.write_private_file, self.workdir / ROOT_FILE, root, 0o644)
            log.info("trust bundle loaded", file=str(self.root_cert_file))

    async def issue(self) -> IssuedCertificate:
        """One new key, CSR and certificate, served at once; raises CAError or ValueError."""
        started = time.monotonic()
        # The key, the CSR and the check of the answer happen in a helper process that
        # holds the key object; cryptography is never loaded here (see pkiclient). The
        # certificate is served inside the block: the helper's exit, waited for at its
        # end, does not delay it.
        async with PkiHelper(self.key_type, self.identity) as helper:
            key_pem, csr = await helper.new_key()
            renew_with = None
            if self.current is not None and self.current.info.not_after > keys.now_utc():
                renew_with = ClientIdentity(self.current.key_pem, self.current.chain_pem)
            chain = await self.client.create_certificate(
                csr, round(self.ttl), self.metadata, renew_with=renew_with
            )
            info = await helper.check_chain(chain)
            chain_pem = "".join(c if c.endswith("\n") else c + "\n" for c in chain).encode()
            await asyncio.to_thread(self._write_files, key_pem, chain_pem)
            issued = IssuedCertificate(info, chain_pem, key_pem, keys.now_utc())
            previous, self.current = self.current, issued
            self.cache.set_workload(chain_pem, key_pem)
            self.issued += 1
            log.info(
                "certificate issued" if previous is None else "certificate rotated",
                identity=self.identity,
                serial=info.serial,
                not_after=info.not_after.isoformat(),
                # From now, not from notBefore: CAs backdate notBefore for clock skew.
                valid_for_s=round((info.not_after - issued.received).total_seconds(), 1),
                previous_serial=previous.info.serial if previous else None,
                took_ms=round((time.monotonic() - started) * 1000, 1),
            )
            if not self.first.is_set():
                self.first.set()
            return issued

    def _write_files(self, key_pem: bytes, chain_pem: bytes) -> None:
        # Key first: a reader pairing the files may see a new key with the old chain
        # for a moment, never a chain whose key is not on disk yet.
        keys.write_private_file(self.workdir / KEY_FILE, key_pem, 0o600)
        keys.write_private_file(self.workdir / CHAIN_FILE, chain_pem, 0o600)

    async def issue_with_retries(self) -> IssuedCertificate:
        """`issue()` until it succeeds, backing off; the old certificate stays served."""
        delays = backoff_delays(self.backoff_initial, self.backoff_max, self.rng)
        attempt = 0
        while True:
            try:
                await self.load_root()
                return await self.issue()
            except (CAError, ValueError, OSError) as e:
                self.failures += 1
                delay = delays[min(attempt, len(delays) - 1)]
                attempt += 1
                expired = self.current is not None and self.current.info.not_after <= keys.now_utc()
                log.warning(
                    "certificate request failed",
                    identity=self.identity,
                    attempt=attempt,
                    error=str(e),
                    retry_in_s=round(delay, 2),
                    serving_serial=self.current.info.serial if self.current else None,
                    serving_expired=expired,
                )
                await asyncio.sleep(delay)

    async def run(self) -> None:
        """Forever: get a certificate, sleep until its renewal time, repeat."""
        while True:
            issued = await self.issue_with_retries()
            delay = rotation_delay(
                issued.info,
                keys.now_utc(),
                received=issued.received,
                ratio=self.ratio,
                jitter=self.jitter,
                rng=self.rng,
            )
            self.next_rotation = time.monotonic() + delay
            log.info(
                "certificate rotation scheduled",
                serial=issued.info.serial,
                rotate_in_s=round(delay, 3),
                rotate_at=(keys.now_utc() + timedelta(seconds=delay)).isoformat(),
            )
            lead = min(HELPER_LEAD, delay / 2)
            await asyncio.sleep(delay - lead)
            try:
                # If it cannot start, issue() tries again and reports why, with retries.
                with contextlib.suppress(OSError):
                    await pkiclient.prestart()
                await asyncio.sleep(lead)
            except asyncio.CancelledError:
                pkiclient.discard_spare()  # stopping: the helper would wait for nothing
                raise
