"""Drives the simulator with the third-party `cs` CloudStack client.

Usage: cs_client.py ENDPOINT API_KEY SECRET_KEY APPLIANCE_VM_ID
Prints one line per step; exits non-zero on any failure.
"""
import sys

from cs import CloudStack, CloudStackApiException

endpoint, key, secret, appliance = sys.argv[1:5]
api = CloudStack(endpoint=endpoint, key=key, secret=secret, poll_interval=0.05, job_timeout=30)

zones = api.listZones()["zone"]
assert len(zones) == 1, zones
print("zones", len(zones))

offerings = api.listDiskOfferings()["diskoffering"]
custom = [o for o in offerings if o["iscustomized"]][0]

vol = api.createVolume(name="from cs", zoneid=zones[0]["id"], diskofferingid=custom["id"], size=1, fetch_result=True)["volume"]
assert vol["state"] == "Allocated", vol
print("created", vol["id"])

# POST as well as GET.
post = CloudStack(endpoint=endpoint, key=key, secret=secret, method="post", poll_interval=0.05, job_timeout=30)
att = post.attachVolume(id=vol["id"], virtualmachineid=appliance, fetch_result=True)["volume"]
assert att["virtualmachineid"] == appliance and att["state"] == "Ready", att
print("attached", att["deviceid"])

listed = api.listVolumes(virtualmachineid=appliance)["volume"]
assert [v["id"] for v in listed] == [vol["id"]], listed

det = api.detachVolume(id=vol["id"], fetch_result=True)["volume"]
assert "virtualmachineid" not in det, det
print("detached")

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
