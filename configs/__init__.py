"""The shipped YAML (policy presets, hardware profiles, model shapes, bench matrices), installed as the
package data ``specmd.configs``; read through ``specmd.resources``."""
