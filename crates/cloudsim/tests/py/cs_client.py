"""Drives the simulator with the third-party `cs` CloudStack client.

Usage: cs_client.py ENDPOINT API_KEY SECRET_KEY APPLIANCE_VM_ID
Prints one line per step; exits non-zero on any failure.
"""
import sys

from cs import CloudStack, CloudStackApiException

endpoint, key, secret, appliance = sys.argv[1:5]
api = CloudStack(endpoint=endpoint, key=key, secret=secret, poll_interval=0.05, job_timeout=30)
post = CloudStack(endpoint=endpoint, key=key, secret=secret, method="post", poll_interval=0.05, job_timeout=30)


def fails(call, **kwargs):
    """Runs an asynchronous call that must fail; returns the job's error."""
    try:
        call(fetch_result=True, **kwargs)
    except CloudStackApiException as e:
        return e.error
    sys.exit("expected %s to fail" % call)


# Listing.
zones = api.listZones()["zone"]
assert len(zones) == 1, zones
print("zones", len(zones))
vms = api.listVirtualMachines(listall=True)["virtualmachine"]
print("vms", len(vms))
sizes = api.listServiceOfferings()["serviceoffering"]
templates = api.listTemplates(templatefilter="executable")["template"]
print("offerings", len(sizes), "templates", len(templates))
offerings = api.listDiskOfferings()["diskoffering"]
custom = [o for o in offerings if o["iscustomized"]][0]

# Volume lifecycle.
vol = api.createVolume(name="from cs", zoneid=zones[0]["id"], diskofferingid=custom["id"], size=1, fetch_result=True)["volume"]
assert vol["state"] == "Allocated", vol
print("created", vol["id"])

# POST as well as GET.
att = post.attachVolume(id=vol["id"], virtualmachineid=appliance, fetch_result=True)["volume"]
assert att["virtualmachineid"] == appliance and att["state"] == "Ready", att
print("attached", att["deviceid"])

listed = api.listVolumes(virtualmachineid=appliance, type="DATADISK")["volume"]
assert [v["id"] for v in listed] == [vol["id"]], listed

det = api.detachVolume(id=vol["id"], fetch_result=True)["volume"]
assert "virtualmachineid" not in det, det
print("detached")

# Root attach: refused while the VM runs, refused while its root is attached, done after both.
workload = [v for v in vms if v["id"] != appliance and v["state"] == "Running"][0]
old_root = api.listVolumes(virtualmachineid=workload["id"], type="ROOT")["volume"][0]
err = fails(api.attachVolume, id=vol["id"], virtualmachineid=workload["id"], deviceid=0)
assert err["errorcode"] == 431, err
print("root refused while running")
stopped = api.stopVirtualMachine(id=workload["id"], fetch_result=True)["virtualmachine"]
assert stopped["state"] == "Stopped", stopped
err = fails(api.attachVolume, id=vol["id"], virtualmachineid=workload["id"], deviceid=0)
assert err["errortext"] == "Vm already has root volume attached to it", err
api.detachVolume(id=old_root["id"], fetch_result=True)
root = api.attachVolume(id=vol["id"], virtualmachineid=workload["id"], deviceid=0, fetch_result=True)["volume"]
assert root["deviceid"] == 0 and root["type"] == "ROOT", root
started = api.startVirtualMachine(id=workload["id"], fetch_result=True)["virtualmachine"]
assert started["state"] == "Running", started
print("root attached", root["deviceid"])

# Put the old root back for a clean cloud, then remove the test volume.
api.stopVirtualMachine(id=workload["id"], fetch_result=True)
api.detachVolume(id=vol["id"], fetch_result=True)
api.attachVolume(id=old_root["id"], virtualmachineid=workload["id"], deviceid=0, fetch_result=True)
api.startVirtualMachine(id=workload["id"], fetch_result=True)

res = post.deleteVolume(id=vol["id"])
assert res["success"] in (True, "true"), res
assert api.listVolumes(id=vol["id"]) == {}, "volume still listed"
print("deleted")

bad = CloudStack(endpoint=endpoint, key=key, secret="wrong-" + secret)
try:
    bad.listZones()
except CloudStackApiException as e:
    assert e.response.status_code == 401, e.response.status_code
    assert e.error["errorcode"] == 401, e.error
    print("refused", e.response.status_code)
else:
    sys.exit("a wrong secret was accepted")
