"""The control channel into the guest: SSH over virtio-serial, keys."""
