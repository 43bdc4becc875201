"""YAML presets shipped with mbir-batch (svct-8view, lact-90, csmri-4x, ...)."""
