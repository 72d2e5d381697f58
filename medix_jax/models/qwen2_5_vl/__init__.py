"""Qwen2.5-VL's own parts: its presets and config keys, and its vision tower with windowed attention."""
