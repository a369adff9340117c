"""Cross-framework benchmarks (the subpackage `attnspec.bench`). See the project's issue tracker
for its status."""
