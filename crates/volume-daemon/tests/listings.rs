//! Listings over real HTTP (a real daemon with the built-in simulator, real SQLite): `?limit=` pages with an
//! RFC 8288 `Link: <…>; rel="next"` header, bodies of the same shape as the whole listing, filters, refusals
//! of bad limits and cursors, and pages that neither repeat nor skip volumes while others are created.
#![allow(clippy::unwrap_used)] // tests unwrap: a panic is the failure report

mod support;

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{TestDaemon, GIB};
use uuid::Uuid;

/// One GET: status, the `Link` header (if any) and the body.
async fn get(d: &TestDaemon, path_and_query: &str) -> (StatusCode, Option<String>, Value) {
    let url = if path_and_query.starts_with(volume_api::API_PREFIX) {
        let origin = d.base.strip_suffix(volume_api::API_PREFIX).unwrap();
        format!("{origin}{path_and_query}")
    } else {
        format!("{}{path_and_query}", d.base)
    };
    let resp = d.http.get(url).send().await.unwrap();
    let status = resp.status();
    let link = resp
        .headers()
        .get("link")
        .map(|v| v.to_str().unwrap().to_string());
    (status, link, resp.json().await.unwrap())
}

/// The target of `<URL>; rel="next"`, checking the header's form.
fn next_of(link: &str) -> String {
    let (target, rel) = link.split_once(">; ").expect("<URL>; rel=\"next\"");
    assert_eq!(rel, "rel=\"next\"", "{link}");
    let target = target.strip_prefix('<').expect("starts with <");
    assert!(
        target.starts_with(volume_api::API_PREFIX),
        "an absolute path: {link}"
    );
    target.to_string()
}

/// Follows `Link` headers from `first`; returns every page's items and how many pages there were.
async fn pages(
    d: &TestDaemon,
    first: &str,
    items: impl Fn(&Value) -> Vec<Value>,
) -> (Vec<Value>, usize) {
    let mut out = Vec::new();
    let mut n = 0;
    let mut next = Some(first.to_string());
    while let Some(url) = next {
        let (s, link, body) = get(d, &url).await;
        assert_eq!(s, StatusCode::OK, "{url}: {body}");
        out.extend(items(&body));
        next = link.map(|l| next_of(&l));
        n += 1;
        assert!(n < 200, "paging does not end");
    }
    (out, n)
}

fn array(v: &Value) -> Vec<Value> {
    v.as_array().expect("an array body").clone()
}

fn ids(items: &[Value], key: &str) -> Vec<String> {
    items
        .iter()
        .map(|v| v[key].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_with_link_headers_filter_and_refuse_bad_limits_and_cursors() {
    let d = TestDaemon::start().await;
    let mut vols = Vec::new();
    for i in 0..7 {
        vols.push(d.create_volume(&format!("list-{i}"), GIB).await);
    }
    let appliance = d.appliance();
    let other = d.other_vm(0);
    for v in &vols[..2] {
        d.run_ok(&format!("/volumes/{v}/attach"), json!({"vm_id": appliance}))
            .await;
    }
    d.run_ok(
        &format!("/volumes/{}/attach", vols[2]),
        json!({"vm_id": other}),
    )
    .await;
    d.delete_ok(vols[6]).await;

    // Unpaginated: everything but the deleted volume, oldest first, no Link.
    let (s, link, all) = get(&d, "/volumes").await;
    assert_eq!(s, StatusCode::OK, "{all}");
    assert_eq!(link, None);
    let all = array(&all);
    let all_ids = ids(&all, "volume_id");
    let want: Vec<String> = vols[..6].iter().map(|v| v.to_string()).collect();
    assert_eq!(all_ids, want);
    // The joined fields are those of the single-volume read (minus the cloud's view, not asked in lists).
    for v in &all {
        let (_, _, one) = get(
            &d,
            &format!("/volumes/{}", v["volume_id"].as_str().unwrap()),
        )
        .await;
        for k in [
            "attachment",
            "export",
            "last_operation",
            "state",
            "linux_state",
            "size",
        ] {
            let (mut a, mut b) = (v[k].clone(), one[k].clone());
            if k == "export" && !a.is_null() {
                // Live counters may move between the two reads.
                for x in [&mut a, &mut b] {
                    x["last_activity"] = Value::Null;
                }
            }
            assert_eq!(a, b, "{k} of {}", v["volume_id"]);
        }
    }
    assert_eq!(all[0]["export"]["status"], "active");
    assert_eq!(all[0]["linux_state"], "present");
    assert_eq!(all[2]["attachment"]["vm_id"], other.as_str());
    assert_eq!(all[5]["last_operation"]["type"], "create");

    // Pages of 4: a Link to the second page, none after it; the same items in the same order.
    let (s, link, first) = get(&d, "/volumes?limit=4").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(array(&first).len(), 4);
    let next = next_of(link.as_deref().expect("a Link header"));
    assert!(next.starts_with("/api/v1/volumes?limit=4&after="), "{next}");
    for limit in [1, 2, 3, 6, 1000] {
        let (got, n) = pages(&d, &format!("/volumes?limit={limit}"), array).await;
        assert_eq!(ids(&got, "volume_id"), want, "pages of {limit}");
        assert_eq!(n, want.len().div_ceil(limit), "pages of {limit}");
    }

    // Filters, alone and across pages (the Link keeps them).
    let filtered = |q: &'static str| {
        let d = &d;
        async move {
            let (s, _, v) = get(d, &format!("/volumes?{q}")).await;
            assert_eq!(s, StatusCode::OK, "{q}: {v}");
            ids(&array(&v), "volume_id")
        }
    };
    assert_eq!(filtered("state=attached").await, ids_of(&vols[..3]));
    assert_eq!(filtered("state=detached").await, ids_of(&vols[3..6]));
    assert_eq!(filtered("state=deleted").await, ids_of(&vols[6..7]));
    assert_eq!(filtered("name=list-4").await, ids_of(&vols[4..5]));
    assert_eq!(filtered("name=list").await, Vec::<String>::new());
    let (s, _, v) = get(&d, &format!("/volumes?vm_id={other}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ids(&array(&v), "volume_id"), ids_of(&vols[2..3]));
    let (s, link, _) = get(&d, "/volumes?state=attached&limit=1").await;
    assert_eq!(s, StatusCode::OK);
    let next = next_of(&link.unwrap());
    assert!(next.contains("state=attached"), "{next}");
    let (got, n) = pages(&d, "/volumes?state=attached&limit=1", array).await;
    assert_eq!((ids(&got, "volume_id"), n), (ids_of(&vols[..3]), 3));

    // Operations: newest first, pages keep the filters.
    let (_, _, ops) = get(&d, "/operations").await;
    let op_ids = ids(&array(&ops), "id");
    assert_eq!(op_ids.len(), 7 + 3 + 1);
    let (got, _) = pages(&d, "/operations?limit=4", array).await;
    assert_eq!(ids(&got, "id"), op_ids);
    let (_, _, creates) = get(&d, "/operations?type=create&status=completed").await;
    let (got, n) = pages(
        &d,
        "/operations?type=create&status=completed&limit=2",
        array,
    )
    .await;
    assert_eq!(ids(&got, "id"), ids(&array(&creates), "id"));
    assert_eq!(n, 4);
    let (_, link, _) = get(&d, "/operations?type=create&limit=2").await;
    assert!(next_of(&link.unwrap()).contains("type=create"));
    let (_, link, one) = get(&d, &format!("/operations?volume_id={}&limit=1", vols[0])).await;
    assert_eq!(array(&one)[0]["type"], "attach", "the newest first");
    assert!(link.is_some(), "its create follows");

    // Exports: `{exports, count}` per page.
    let (_, link, whole) = get(&d, "/exports").await;
    assert_eq!((whole["count"].as_u64(), link), (Some(2), None));
    let (got, n) = pages(&d, "/exports?limit=1", |v| {
        assert_eq!(v["count"], 1);
        v["exports"].as_array().unwrap().clone()
    })
    .await;
    assert_eq!(n, 2);
    assert_eq!(
        ids(&got, "export_name"),
        ids(whole["exports"].as_array().unwrap(), "export_name")
    );

    // Bad limits, cursors and filters: 400 with the field at fault.
    for (path, field) in [
        ("/volumes?limit=0", Some("limit")),
        ("/volumes?limit=1001", Some("limit")),
        ("/volumes?limit=ten", Some("limit")),
        ("/volumes?after=nonsense", Some("after")),
        ("/volumes?after=6162", Some("after")),
        ("/volumes?state=lost", Some("state")),
        ("/volumes?colour=red", Some("colour")),
        ("/operations?limit=0", Some("limit")),
        ("/operations?after=zz", Some("after")),
        ("/exports?limit=-1", Some("limit")),
        ("/exports?after=00", Some("after")),
    ] {
        let (s, _, body) = get(&d, path).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["code"], "invalid_request", "{path}");
        assert_eq!(body["field"].as_str(), field, "{path}: {body}");
    }

    for v in &vols[..3] {
        d.run_ok(&format!("/volumes/{v}/detach"), json!({})).await;
    }
    d.stop().await;
}

fn ids_of(v: &[Uuid]) -> Vec<String> {
    v.iter().map(|v| v.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_neither_repeat_nor_skip_volumes_created_meanwhile() {
    let d = TestDaemon::start_with(|c| c.sim.job_delay_ms = 0).await;
    let mut at_start = HashSet::new();
    for i in 0..12 {
        at_start.insert(
            d.create_volume(&format!("before-{i}"), GIB)
                .await
                .to_string(),
        );
    }
    let (_, _, ops) = get(&d, "/operations").await;
    let ops_at_start: HashSet<String> = ids(&array(&ops), "id").into_iter().collect();

    // Creations run while the pages are read.
    let writer = {
        let base = d.base.clone();
        let body = json!({"name": "during", "size": GIB, "disk_offering_id": d.custom_offering(),
                          "zone_id": d.zone()});
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for _ in 0..15 {
                let op: Value = http
                    .post(format!("{base}/volumes"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let id = op["id"].as_str().unwrap();
                http.get(format!("{base}/operations/{id}?wait=30"))
                    .send()
                    .await
                    .unwrap();
            }
        })
    };
    for (first, key) in [
        ("/volumes?limit=2", "volume_id"),
        ("/operations?limit=3", "id"),
    ] {
        let (got, _) = pages(&d, first, array).await;
        let got = ids(&got, key);
        let unique: HashSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "{first}: an item was listed twice");
        let start = if key == "id" {
            &ops_at_start
        } else {
            &at_start
        };
        for id in start {
            assert!(
                unique.contains(id),
                "{first}: {id}, there at the start, was skipped"
            );
        }
    }
    writer.await.unwrap();
    // When the writes are over, pages concatenate to the whole listing again.
    let (_, _, all) = get(&d, "/volumes").await;
    let (got, _) = pages(&d, "/volumes?limit=5", array).await;
    assert_eq!(ids(&got, "volume_id"), ids(&array(&all), "volume_id"));
    assert_eq!(got.len(), 27);
    d.stop().await;
}

/// The predecessor's filters of `GET /exports`: `volume_id` and `status` filter (and page with the cursor's
/// filters kept); `vm_name`, a name this daemon does not record, is refused by name rather than ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_filter_by_volume_and_status_and_refuse_a_vm_name() {
    let d = TestDaemon::start_with(|c| c.reconcile_repair = false).await;
    let mut vols = Vec::new();
    for i in 0..3 {
        let v = d.create_volume(&format!("exp-{i}"), GIB).await;
        d.attach_to_appliance(v).await;
        vols.push(v);
    }
    // One export stops being served (CloudStack detaches its volume behind the daemon's back: fenced).
    d.detach_behind_the_daemons_back(vols[1]).await;
    let mut inactive = Vec::new();
    for _ in 0..200 {
        let (_, _, v) = get(&d, "/exports?status=inactive").await;
        inactive = ids(&array(&v["exports"]), "volume_id");
        if !inactive.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(inactive, [vols[1].to_string()]);
    let (s, _, v) = get(&d, "/exports?status=active").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut active = ids(&array(&v["exports"]), "volume_id");
    active.sort();
    let mut want = vec![vols[0].to_string(), vols[2].to_string()];
    want.sort();
    assert_eq!(active, want);
    assert_eq!(v["count"], 2, "{v}");
    let (_, _, v) = get(&d, &format!("/exports?volume_id={}", vols[2])).await;
    assert_eq!(
        ids(&array(&v["exports"]), "volume_id"),
        [vols[2].to_string()]
    );
    let (_, _, v) = get(
        &d,
        &format!("/exports?volume_id={}&status=inactive", vols[2]),
    )
    .await;
    assert_eq!(v["count"], 0, "{v}");
    // The predecessor's client sends every filter, empty ones included.
    let (s, _, v) = get(&d, "/exports?volume_id=&status=active&vm_name=").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["count"], 2, "{v}");
    // Paging keeps the filter in the next page's link.
    let (_, link, v) = get(&d, "/exports?status=active&limit=1").await;
    let next = next_of(&link.expect("a next page"));
    assert!(next.contains("status=active"), "{next}");
    let (_, _, v2) = get(&d, &next).await;
    let mut paged = ids(&array(&v["exports"]), "volume_id");
    paged.extend(ids(&array(&v2["exports"]), "volume_id"));
    paged.sort();
    assert_eq!(paged, want);
    for (path, field) in [
        ("/exports?vm_name=web-01", "vm_name"),
        ("/exports?status=lost", "status"),
        ("/exports?volume_id=nope", "volume_id"),
    ] {
        let (s, _, v) = get(&d, path).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["field"], field, "{path}: {v}");
    }
    d.stop().await;
}
