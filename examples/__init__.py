"""Example SavedModels built from data shipped in installed packages, compiled into servables."""
