"""Ray jobs: the render farm and the nightly benchmark."""
