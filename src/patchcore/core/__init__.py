"""Pure algorithms on tensors (PATCHCORE.md sections 1-3): no files, no backbones, no state."""
