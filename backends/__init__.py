"""attnspec's own framework backends (the subpackage `attnspec.backends`).

Each backend lives in its own module, mirrors the reference's module names (entmax, span,
attention) and never imports another backend. They are listed here, not imported: the
registry imports one the first time a call of its array type needs it.

BUILTIN_BACKENDS maps a backend name to (module, attribute holding the Backend, array types).
"""

BUILTIN_BACKENDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "torch-eager": ("attnspec.backends.torch", "EAGER", ("torch",)),
    "torch": ("attnspec.backends.torch", "TILED", ("torch",)),
    "torch-sdpa": ("attnspec.backends.torch", "SDPA", ("torch",)),
    "torch-decode": ("attnspec.backends.torch", "DECODE", ("torch",)),
    "jax": ("attnspec.backends.jax", "BACKEND", ("jax",)),
    "triton": ("attnspec.backends.triton", "TRITON", ("torch",)),
}
