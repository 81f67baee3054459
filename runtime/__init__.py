"""Kiln's cloud-agnostic core: servables, engines, and (from here on) serving."""
