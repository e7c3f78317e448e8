"""torpor_pv: the PV guest type for torpor (a plugin of the ``torpor`` entry-point group)."""
