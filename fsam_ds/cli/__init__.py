"""The commands: fsam-train, fsam-launch, fsam-sweep, fsam-report, the demo, and asset fetching."""
