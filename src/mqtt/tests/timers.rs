//! The connect timeout and keep-alive.

use super::*;

#[test]
fn connect_timeout_and_keep_alive() {
    let now = Instant::now();
    let mut s = Session::new(limits(), now);
    assert_eq!(s.poll_deadline(), Some(now + Duration::from_secs(5)));
    s.handle_timeout(now + Duration::from_secs(4));
    assert!(!s.is_closed());
    s.handle_timeout(now + Duration::from_secs(5));
    assert!(matches!(
        &events(&mut s)[..],
        [Event::Close(CloseReason::ConnectTimeout)]
    ));

    let (mut s, now) = connected(Version::V311);
    // keep_alive 10 s: closed after 1.5 x without a packet.
    assert_eq!(s.poll_deadline(), Some(now + Duration::from_secs(15)));
    let later = now + Duration::from_secs(12);
    s.handle_bytes(&bytes(&Packet::PingReq, Version::V311), later);
    assert!(matches!(
        &sent(&mut s, Version::V311)[..],
        [Packet::PingResp]
    ));
    s.handle_timeout(now + Duration::from_secs(15));
    assert!(!s.is_closed(), "the PINGREQ moved the deadline");
    s.handle_timeout(later + Duration::from_secs(15));
    assert!(s.is_closed());
}

#[test]
fn connect_timeout_is_a_deadline_for_the_whole_connect() {
    let v = Version::V311;
    let start = Instant::now();
    let mut s = Session::new(limits(), start);
    let connect = bytes(&connect(v, "slow", true, 10), v);
    // One byte a second: every byte is "activity", none moves the
    // deadline (5 s from the start).
    for (i, b) in connect.iter().take(connect.len() - 1).enumerate() {
        let t = start + Duration::from_secs(i as u64);
        s.handle_timeout(t);
        s.handle_bytes(&[*b], t);
        if s.is_closed() {
            break;
        }
    }
    assert!(connect.len() > 6);
    assert!(s.is_closed(), "closed at the deadline, not reset per byte");
    assert!(matches!(
        &events(&mut s)[..],
        [Event::Close(CloseReason::ConnectTimeout)]
    ));
}
