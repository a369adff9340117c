__version__ = "0.1.0"
#: Version of SPEC.md that the reference implements; reports name it.
SPEC_VERSION = "1.1"
