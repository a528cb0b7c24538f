"""Domain XML (pure) and the libvirt adapter."""
