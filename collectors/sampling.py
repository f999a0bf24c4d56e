"""Deterministic request sampling.

A request is sampled when a keyed hash of its request key falls under the rate, so the same request
key gets the same decision on every replica and every run (useful to re-run a request through a
second model, or to join latentwatch records with logs), and the hashed key that leaves the process
cannot be reversed without the salt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets

log = logging.getLogger(__name__)
SALT_ENV = "LATENTWATCH_TAP_SALT"


def deployment_salt(salt: bytes | str | None = None) -> bytes:
    """The key for hashing request keys: ``salt`` if given, else ``$LATENTWATCH_TAP_SALT`` (one secret per
    deployment, e.g. a Kubernetes Secret, so every replica samples the same keys), else a random salt for
    this process (hashed keys then cannot be joined across replicas or restarts; a warning says so).
    There is no public default: a known salt would let anyone map request ids to the hashed keys records carry.
    """
    if salt is None:
        salt = os.environ.get(SALT_ENV) or None
        if salt is None:
            log.warning("latentwatch tap: no salt given and $%s unset: using a random per-process salt "
                        "(sampling and hashed keys differ across replicas and restarts)", SALT_ENV)
            return secrets.token_bytes(32)
    value = salt.encode() if isinstance(salt, str) else bytes(salt)
    if len(value) < 8:
        raise ValueError(f"the tap's salt must be at least 8 bytes, got {len(value)}")
    return value


class Sampler:
    """Decide per request key whether to sample it; ``rate`` in [0, 1].

    >>> s = Sampler(rate=0.5, salt=b"demo-salt")
    >>> s.sampled("request-1") == s.sampled("request-1")
    True
    >>> sum(s.sampled(f"r{i}") for i in range(10_000)) / 10_000  # doctest: +SKIP
    0.5
    """

    def __init__(self, rate: float, salt: bytes) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"sample rate must be in [0, 1], got {rate}")
        self.rate = rate
        self.salt = salt
        self._threshold = int(rate * 2**64)

    def digest(self, key: str) -> bytes:
        """16-byte keyed BLAKE2b hash of a request key."""
        return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16, key=self.salt[:64]).digest()

    def hashed_key(self, key: str) -> str:
        """The hex hash that records carry instead of the request key."""
        return self.digest(key).hex()

    def sampled(self, key: str) -> bool:
        """True if the request with this key is sampled."""
        if self.rate >= 1.0:
            return True
        if self.rate <= 0.0:
            return False
        return int.from_bytes(self.digest(key)[:8], "little") < self._threshold
