"""Drives the simulator with apache-libcloud's CloudStack compute driver.

Usage: libcloud_client.py ENDPOINT API_KEY SECRET_KEY APPLIANCE_VM_ID
Prints one line per step; exits non-zero on any failure.
"""
import sys
from urllib.parse import urlparse

from libcloud.compute.providers import get_driver
from libcloud.compute.types import Provider

endpoint, key, secret, appliance = sys.argv[1:5]
url = urlparse(endpoint)
Driver = get_driver(Provider.CLOUDSTACK)
driver = Driver(key=key, secret=secret, host=url.hostname, port=url.port, path=url.path, secure=False)
driver.connection.poll_interval = 0.05

nodes = driver.list_nodes()
assert any(n.id == appliance for n in nodes), [n.id for n in nodes]
print("nodes", len(nodes))
sizes = driver.list_sizes()
print("sizes", len(sizes))
images = driver.list_images()
assert images and images[0].extra["format"] == "QCOW2", images
print("images", len(images))
locations = driver.list_locations()
print("locations", len(locations))

node = [n for n in nodes if n.id == appliance][0]
vol = driver.create_volume(size=1, name="from libcloud", location=locations[0])
print("created", vol.id)
assert driver.attach_volume(node, vol)
attached = [v for v in driver.list_volumes(node=node) if v.id == vol.id]
assert attached and attached[0].extra["volume_type"] == "DATADISK", attached
print("attached", attached[0].extra["device_id"])
assert driver.detach_volume(vol)
assert not [v for v in driver.list_volumes(node=node) if v.id == vol.id]
print("detached")
assert driver.destroy_volume(vol)
assert vol.id not in [v.id for v in driver.list_volumes()]
print("destroyed")
