"""torpor-pvh: PVH guests for torpor (an example of a third-party guest-type plugin)."""
