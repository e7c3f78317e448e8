"""torpor_hvm: the HVM guest type for torpor (no PV drivers; ACPI S3 through QEMU)."""
