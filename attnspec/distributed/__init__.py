"""Attention over a sequence sharded across devices (context parallelism), with SPEC.md's
semantics: `attnspec.distributed.torch.attention` on a torch.distributed process group,
`attnspec.distributed.jax.attention` inside shard_map over a mesh axis. Span heads fetch a
halo of neighbouring keys (a static bound); other heads ring over all keys. Frameworks load
only when their module is imported."""

from . import geometry  # noqa: F401
