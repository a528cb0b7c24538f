"""The local busybox OCI image of the CRI tests (hack/vsbench/oci.py, shared with the bench)."""

from vsbench.oci import busybox_image_tar

__all__ = ["busybox_image_tar"]
