"""torpor_pvhvm: the PVHVM guest type for torpor (HVM with PV drivers)."""
