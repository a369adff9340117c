"""The conformance suite (the subpackage `attnspec.conformance`): Hypothesis checks of any
backend's values and gradients against the NumPy reference. See the project's issue tracker for
its status; the reference and the dispatcher it stands on live in `attnspec`."""
