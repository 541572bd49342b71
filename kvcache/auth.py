"""Who may call a cache node, and whose blocks each call sees.

Callers present a token in the call metadata (``authorization: Bearer
<token>``). A node knows two kinds of token:

- the cluster token: held by the nodes (a leaving node hands its blocks off
  with it) and by the engines of a single-tenant deployment. Its calls name
  stored keys as they are.
- tenant tokens, each bound to one tenant name. The node scopes every key of
  such a call: it stores and looks up ``scope(tenant) + key`` (a 16-byte
  digest of the tenant's name in front of the 32-byte block key). Two tenants
  asking for the same block key reach two different entries, so a tenant can
  neither read nor overwrite another's blocks, whatever keys it computes.

A node with no token at all is open (every caller acts with the cluster
token's rights); that is for a node bound to 127.0.0.1 in development.

`AuthInterceptor` refuses a call without a known token (UNAUTHENTICATED)
before its handler runs or its stream is read; the handlers then ask
`Authenticator.caller` which `Caller` they serve. Tokens are compared as
SHA-256 digests looked up in a dict, then confirmed with
`hmac.compare_digest`, so the time taken does not depend on how much of a
guess matches a real token.

Not here: transport security (`kvcache.server` and `kvcache.client` take TLS
files); the threat model (kvcache/README.md).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from kvcache.errors import ConfigError, InvalidRequest
from kvcache.keys import KEY_SIZE
from kvcache.uploads import check_key

#: Metadata key carrying the token (lower case, as gRPC requires).
AUTH_METADATA_KEY = "authorization"
#: Bytes of tenant scope in front of a tenant's stored keys.
SCOPE_SIZE = 16
#: Shortest token a node accepts (bytes of text).
MIN_TOKEN_LENGTH = 16


def tenant_scope(tenant: str) -> bytes:
    """The 16-byte prefix of `tenant`'s stored keys."""
    return hashlib.blake2b(b"kvgate-tenant-v1\x1f" + tenant.encode(), digest_size=SCOPE_SIZE).digest()


def placement_key(stored: bytes) -> bytes:
    """The block key a stored key was placed by on the ring (its tenant scope removed)."""
    return stored[SCOPE_SIZE:] if len(stored) == SCOPE_SIZE + KEY_SIZE else stored


def call_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with every call (empty without a token)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


@dataclass(frozen=True, slots=True)
class Caller:
    """Whom a call acts for.

    Attributes:
        tenant: the tenant's name, or None for the cluster token (and an open node).
        scope: prefix of the tenant's stored keys (empty for the cluster).
    """

    tenant: str | None
    scope: bytes = b""

    def stored_key(self, key: bytes) -> bytes:
        """The key under which this caller's `key` is stored.

        Raises:
            InvalidRequest: a key no caller may name (empty, too long), or a
                tenant's key that is not a plain block key.
        """
        check_key(key)
        if not self.scope:
            return key
        if len(key) != KEY_SIZE:
            raise InvalidRequest("key", f"tenant block keys are {KEY_SIZE} bytes, got {len(key)}")
        return self.scope + key


CLUSTER = Caller(tenant=None)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Tokens a node accepts and whom each one stands for.

    Args:
        cluster_token: the cluster's token, or empty.
        tenant_tokens: tenant name -> its token.

    Raises:
        ConfigError: a token shorter than `MIN_TOKEN_LENGTH`, one token given
            twice, or tenant tokens without a cluster token (hand-off needs it).
    """

    def __init__(self, cluster_token: str = "", tenant_tokens: Mapping[str, str] | None = None) -> None:
        grants: dict[bytes, Caller] = {}
        tenants = dict(tenant_tokens or {})
        if tenants and not cluster_token:
            raise ConfigError("tenant tokens need a cluster token too: nodes hand blocks off with it")
        for tenant, token in [("", cluster_token), *tenants.items()] if cluster_token else []:
            if len(token) < MIN_TOKEN_LENGTH:
                raise ConfigError(f"token of {tenant or 'the cluster'} is shorter than {MIN_TOKEN_LENGTH} characters")
            digest = _digest(token)
            if digest in grants:
                raise ConfigError(f"the token of {tenant or 'the cluster'} is used twice")
            grants[digest] = Caller(tenant, tenant_scope(tenant)) if tenant else CLUSTER
        self._grants = grants

    @property
    def open(self) -> bool:
        """Whether every caller is let in (no token configured)."""
        return not self._grants

    def caller(self, metadata: Sequence[tuple[str, Any]] | None) -> Caller | None:
        """Whom a call with this metadata acts for, or None if its token is missing or unknown."""
        if self.open:
            return CLUSTER
        presented = ""
        for name, value in metadata or ():
            if name == AUTH_METADATA_KEY:
                text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                presented = text.removeprefix("Bearer ").strip()
                break
        if not presented:
            return None
        digest = _digest(presented)
        found: Caller | None = None
        for known, caller in self._grants.items():
            # Every grant is compared, to the end, so the time spent says
            # neither which one matched nor how much of a guess did.
            if hmac.compare_digest(known, digest):
                found = caller
        return found


def _denial(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that refuses the call unread."""
    message = "missing or unknown token (send 'authorization: Bearer <token>')"

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    if handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
        return make(streaming)
    make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(unary)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose token the `Authenticator` does not know.

    Args:
        authenticator: the accepted tokens.
        refused: called with the method name of each refused call (a metric).
    """

    def __init__(self, authenticator: Authenticator, refused: Callable[[str], None] | None = None) -> None:
        self._auth = authenticator
        self._refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or self._auth.caller(handler_call_details.invocation_metadata) is not None:
            return handler
        if self._refused is not None:
            self._refused(handler_call_details.method.rsplit("/", 1)[-1])
        return _denial(handler)


def read_token_file(path: str | Path) -> str:
    """The token in a file (surrounding whitespace removed).

    Raises:
        ConfigError: the file cannot be read or is empty.
    """
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc}") from exc
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


def read_tenant_tokens(path: str | Path) -> dict[str, str]:
    """Tenant tokens from a file of ``TENANT TOKEN`` lines (``#`` starts a comment).

    Raises:
        ConfigError: unreadable file, a malformed line or a tenant named twice.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read tenant tokens file {path}: {exc}") from exc
    tokens: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{path}:{number}: expected 'TENANT TOKEN'")
        tenant, token = parts
        if tenant in tokens:
            raise ConfigError(f"{path}:{number}: tenant {tenant!r} named twice")
        tokens[tenant] = token
    return tokens
