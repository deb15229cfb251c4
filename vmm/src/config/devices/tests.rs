use super::*;

#[test]
fn disk_parses_all_options_and_round_trips() {
    let d: DiskConfig = "path=/var/img/a.raw,ro=on,id=root".parse().unwrap();
    assert_eq!(d.path, PathBuf::from("/var/img/a.raw"));
    assert!(d.read_only);
    assert_eq!(d.id.as_ref().unwrap().as_str(), "root");
    assert_eq!(d.to_string().parse::<DiskConfig>().unwrap(), d);
    let d: DiskConfig = "path=x.img".parse().unwrap();
    assert!(!d.read_only);
    assert_eq!(d.id, None);
    let d: DiskConfig = "ro=off,path=x.img".parse().unwrap();
    assert!(!d.read_only);
}

#[test]
fn disk_errors_name_the_problem() {
    let e = |s: &str| s.parse::<DiskConfig>().unwrap_err().to_string();
    assert_eq!(e(""), "missing option path=");
    assert_eq!(e("ro=on"), "missing option path=");
    assert_eq!(e("path="), "path= is empty");
    assert_eq!(e("path=a,path=b"), "option \"path\" given twice");
    assert_eq!(e("path=a,ro=yes"), "ro=\"yes\": expected on or off");
    assert_eq!(
        e("path=a,cache=none"),
        "unknown option \"cache\" (known: path, ro, id, bw, iops)"
    );
    assert_eq!(e("/tmp/a.img"), "\"/tmp/a.img\" is not KEY=VALUE");
    assert!(e("path=a,id=abcdefghijklmnopqrstu").contains("1-20 printable ASCII"));
    assert!(e("path=a,id=a b").contains("1-20 printable ASCII"));
    assert!(e("path=a,id=").contains("1-20"));
}

#[test]
fn net_parses_and_derives_a_stable_unicast_mac() {
    let n: NetConfig = "tap=tap0,mac=06:00:AC:10:00:02".parse().unwrap();
    assert_eq!(n.mac, Some(MacAddr([6, 0, 0xac, 0x10, 0, 2])));
    assert_eq!(n.to_string(), "tap=tap0,mac=06:00:ac:10:00:02");
    let n: NetConfig = "tap=vm1".parse().unwrap();
    let m = n.mac_or_default();
    assert_eq!(m, MacAddr::derived_from("vm1"));
    assert_eq!(m.0[0] & 0b11, 0b10, "locally administered unicast");
    assert_ne!(m, MacAddr::derived_from("vm2"));
    // Pinned: a guest's address must not change between releases.
    assert_eq!(
        MacAddr::derived_from("tap0").to_string(),
        "06:16:d0:ac:07:ef"
    );
}

#[test]
fn net_errors() {
    let e = |s: &str| s.parse::<NetConfig>().unwrap_err().to_string();
    assert_eq!(e("mac=06:00:00:00:00:01"), "missing option tap=");
    assert!(e("tap=averyveryverylongname").contains("1-15 characters"));
    assert!(e("tap=a/b").contains("no '/'"));
    assert!(e("tap=..").contains("TAP name"));
    assert!(e("tap=t,mac=06:00:00:00:00").contains("six hex bytes"));
    assert!(e("tap=t,mac=06:00:00:00:00:00:00").contains("six hex bytes"));
    assert!(e("tap=t,mac=06:00:00:00:00:zz").contains("six hex bytes"));
    assert!(e("tap=t,mac=6:0:0:0:0:1").contains("six hex bytes"));
    assert_eq!(
        e("tap=t,mac=01:00:5e:00:00:01"),
        "MAC address 01:00:5e:00:00:01: a NIC needs a unicast address (first byte even)"
    );
}

#[test]
fn balloon_defaults_and_options() {
    assert_eq!(
        "".parse::<BalloonConfig>().unwrap(),
        BalloonConfig::default()
    );
    let b: BalloonConfig = "deflate-on-oom=on,free-page-reporting=on,stats-interval-s=5"
        .parse()
        .unwrap();
    assert!(b.deflate_on_oom && b.free_page_reporting);
    assert_eq!(b.stats_interval_s, 5);
    assert_eq!(b.to_string().parse::<BalloonConfig>().unwrap(), b);
    let e = |s: &str| s.parse::<BalloonConfig>().unwrap_err().to_string();
    assert_eq!(
        e("stats-interval-s=-1"),
        "stats-interval-s=\"-1\": expected a whole number"
    );
    assert!(e("target=5").starts_with("unknown option \"target\""));
}

#[test]
fn on_off_options_use_the_one_parser() {
    let d: DiskConfig = "path=/a,ro=true".parse().unwrap();
    assert!(d.read_only);
    assert_eq!(
        "path=/a,ro=yes"
            .parse::<DiskConfig>()
            .unwrap_err()
            .to_string(),
        "ro=\"yes\": expected on or off"
    );
    assert_eq!(d.to_string(), "path=/a,ro=on");
}

#[test]
fn serde_uses_the_cli_keys_and_validates() {
    let d: DiskConfig = serde_json::from_str(r#"{"path":"/a.img","ro":true,"id":"data"}"#).unwrap();
    assert!(d.read_only);
    assert_eq!(
        serde_json::to_string(&d).unwrap(),
        r#"{"path":"/a.img","ro":true,"id":"data"}"#
    );
    assert!(serde_json::from_str::<DiskConfig>(r#"{"path":"/a","id":"x y"}"#).is_err());
    assert!(serde_json::from_str::<DiskConfig>(r#"{"path":"/a","cache":1}"#).is_err());
    let n: NetConfig = serde_json::from_str(r#"{"tap":"tap0","mac":"06:00:00:00:00:01"}"#).unwrap();
    assert_eq!(
        serde_json::to_string(&n).unwrap(),
        r#"{"tap":"tap0","mac":"06:00:00:00:00:01"}"#
    );
    assert!(serde_json::from_str::<NetConfig>(r#"{"tap":"tap0","mac":"bad"}"#).is_err());
    let b: BalloonConfig = serde_json::from_str(r#"{"stats-interval-s":3}"#).unwrap();
    assert_eq!(b.stats_interval_s, 3);
    assert!(!b.deflate_on_oom);
}

#[test]
fn rates_parse_with_suffixes_default_per_device_and_round_trip() {
    let d: DiskConfig = "path=a.img,bw=200M,iops=5000".parse().unwrap();
    assert_eq!(d.bytes_per_s(), Some(200 << 20));
    assert_eq!(d.ops_per_s(), Some(5000));
    assert_eq!(d.to_string(), "path=a.img,ro=off,bw=200M,iops=5000");
    assert_eq!(d.to_string().parse::<DiskConfig>().unwrap(), d);
    let d: DiskConfig = "path=a.img".parse().unwrap();
    assert_eq!(d.bytes_per_s(), Some(DEFAULT_DISK_BYTES_PER_S));
    assert_eq!(d.ops_per_s(), Some(DEFAULT_DISK_IOPS));
    let d: DiskConfig = "path=a.img,bw=0,iops=0".parse().unwrap();
    assert_eq!(
        (d.bytes_per_s(), d.ops_per_s()),
        (None, None),
        "0 is unlimited"
    );

    let n: NetConfig = "tap=t0,bw=1G,pps=64k,mac-filter=off".parse().unwrap();
    assert_eq!(n.bytes_per_s(), Some(1 << 30));
    assert_eq!(n.frames_per_s(), Some(64 << 10));
    assert!(!n.filters_source_mac());
    assert_eq!(n.to_string(), "tap=t0,bw=1G,pps=64K,mac-filter=off");
    assert_eq!(n.to_string().parse::<NetConfig>().unwrap(), n);
    let n: NetConfig = "tap=t0".parse().unwrap();
    assert!(n.filters_source_mac(), "on by default");
    assert_eq!(n.frames_per_s(), Some(DEFAULT_NET_PPS));

    let e = |s: &str| s.parse::<DiskConfig>().unwrap_err().to_string();
    for bad in [
        "bw=",
        "bw=fast",
        "bw=1T",
        "bw=-1",
        "bw=1.5M",
        "iops=99999999999999999999",
    ] {
        let msg = e(&format!("path=a,{bad}"));
        assert!(msg.contains("expected a rate such as"), "{bad}: {msg}");
    }
    assert!(
        e("path=a,bw=18014398509481984G").contains("expected a rate"),
        "overflow"
    );
}

#[test]
fn rates_in_an_instance_file_are_integers_or_strings() {
    let d: DiskConfig = serde_json::from_str(r#"{"path":"/a","bw":"64M","iops":100}"#).unwrap();
    assert_eq!(
        (d.bytes_per_s(), d.ops_per_s()),
        (Some(64 << 20), Some(100))
    );
    assert!(serde_json::from_str::<DiskConfig>(r#"{"path":"/a","bw":"lots"}"#).is_err());
    let n: NetConfig =
        serde_json::from_str(r#"{"tap":"t","pps":"10K","mac-filter":false}"#).unwrap();
    assert_eq!(n.frames_per_s(), Some(10 << 10));
    assert!(!n.filters_source_mac());
}
