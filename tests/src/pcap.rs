//! A small reader for the captures that [`crate::Capture`] writes: classic pcap files
//! of Ethernet frames, from which it takes IPv4 TCP segments and rebuilds each
//! direction of each connection as one byte stream.
//!
//! The file format is the classic libpcap one (magic `a1b2c3d4`, or `a1b23c4d` with
//! nanosecond timestamps, in either byte order), not pcapng. Only link type 1
//! (Ethernet, optionally with one 802.1Q tag) is read. IPv6, IPv4 fragments and
//! non-TCP packets are skipped. All header fields are big-endian on the wire.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

/// libpcap's `LINKTYPE_ETHERNET`.
const LINKTYPE_ETHERNET: u32 = 1;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;

/// TLS record content types (RFC 8446 section 5.1).
const TLS_CHANGE_CIPHER_SPEC: u8 = 0x14;
const TLS_ALERT: u8 = 0x15;
const TLS_HANDSHAKE: u8 = 0x16;
const TLS_APPLICATION_DATA: u8 = 0x17;
/// `legacy_record_version` of every TLS 1.2 and 1.3 record but the first `ClientHello`.
const TLS_RECORD_VERSION: u16 = 0x0303;
/// Record version that RFC 8446 section 5.1 allows on an initial `ClientHello`, and that
/// rustls sends there.
const TLS_CLIENT_HELLO_RECORD_VERSION: u16 = 0x0301;
/// Largest record length field: 2^14 bytes of plaintext plus 256 of expansion.
const TLS_MAX_RECORD_LEN: usize = (1 << 14) + 256;

/// One TCP segment that carried data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// Sequence number of the first payload byte.
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// One direction of one TCP connection, rebuilt from its segments in sequence order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// Contiguous stretches of the byte stream, in sequence order. There is more than
    /// one only when the capture missed segments, and each gap splits the stream.
    pub runs: Vec<Vec<u8>>,
}

/// A TCP packet with or without data. Its SYN flag marks the start of a connection.
#[derive(Debug)]
struct TcpPacket {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    seq: u32,
    flags: u8,
    payload: Vec<u8>,
}

/// Reads the TCP segments that carried data in the pcap file at `path`, in capture order.
///
/// # Panics
///
/// If the file cannot be read or is not a classic Ethernet pcap: the capture is part of
/// the test, so the test fails there with the reason.
pub fn tcp_payloads(path: &Path) -> Vec<Segment> {
    data_segments(read_packets(path))
}

/// Rebuilds every TCP flow in the pcap file at `path`, in order of each flow's first packet.
///
/// # Panics
///
/// As [`tcp_payloads`].
pub fn tcp_flows(path: &Path) -> Vec<Flow> {
    reassemble(read_packets(path))
}

/// Reports whether `marker` occurs in the bytes of any flow in the capture at `path`,
/// also when the marker is split across segments.
///
/// # Panics
///
/// As [`tcp_payloads`].
pub fn contains(path: &Path, marker: &[u8]) -> bool {
    tcp_flows(path)
        .iter()
        .flat_map(|flow| &flow.runs)
        .any(|run| contains_bytes(run, marker))
}

/// Counts TLS records on the flows to or from TCP `port` in the capture at `path`,
/// returning `(handshake, application_data)`.
///
/// Each flow is walked record by record from its first byte. The walk stops at the
/// first bytes that are not a record header (content type 0x14 to 0x17, version
/// 0x0303, or 0x0301 on a handshake record). It also stops at a gap in the capture and
/// at a record cut off by the end of the capture. A plaintext flow counts `(0, 0)`.
///
/// # Panics
///
/// As [`tcp_payloads`].
pub fn tls_record_counts(path: &Path, port: u16) -> (usize, usize) {
    tcp_flows(path)
        .iter()
        .filter(|flow| flow.src.port() == port || flow.dst.port() == port)
        .filter_map(|flow| flow.runs.first())
        .map(|stream| count_tls_records(stream))
        .fold((0, 0), |(handshake, data), (h, d)| {
            (handshake + h, data + d)
        })
}

/// Parses a whole classic pcap file held in memory into its data-carrying TCP segments.
pub fn parse_segments(bytes: &[u8]) -> io::Result<Vec<Segment>> {
    Ok(data_segments(parse_packets(bytes)?))
}

fn data_segments(packets: Vec<TcpPacket>) -> Vec<Segment> {
    packets
        .into_iter()
        .filter(|packet| !packet.payload.is_empty())
        .map(|packet| Segment {
            src: packet.src,
            dst: packet.dst,
            seq: packet.seq,
            payload: packet.payload,
        })
        .collect()
}

fn read_packets(path: &Path) -> Vec<TcpPacket> {
    let bytes = fs::read(path)
        .unwrap_or_else(|err| panic!("failed to read capture {}: {err}", path.display()));
    parse_packets(&bytes)
        .unwrap_or_else(|err| panic!("failed to parse capture {}: {err}", path.display()))
}

fn parse_packets(bytes: &[u8]) -> io::Result<Vec<TcpPacket>> {
    let header = bytes
        .get(..24)
        .ok_or_else(|| invalid_data("file is shorter than the 24-byte pcap header".to_owned()))?;
    let magic = [header[0], header[1], header[2], header[3]];
    let big_endian = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => false,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => true,
        [0x0a, 0x0d, 0x0d, 0x0a] => {
            return Err(invalid_data("file is pcapng, not classic pcap".to_owned()))
        }
        _ => return Err(invalid_data(format!("unknown pcap magic {magic:02x?}"))),
    };
    let read_u32 = |at: usize, from: &[u8]| -> u32 {
        let field = [from[at], from[at + 1], from[at + 2], from[at + 3]];
        if big_endian {
            u32::from_be_bytes(field)
        } else {
            u32::from_le_bytes(field)
        }
    };
    let link_type = read_u32(20, header);
    if link_type != LINKTYPE_ETHERNET {
        return Err(invalid_data(format!(
            "link type {link_type} is not Ethernet ({LINKTYPE_ETHERNET})"
        )));
    }

    let mut packets = Vec::new();
    let mut rest = &bytes[24..];
    // Record header: seconds, sub-second part, captured length, original length.
    while rest.len() >= 16 {
        let captured_len = read_u32(8, rest) as usize;
        // A record cut short is the normal end of a capture stopped mid-write.
        let Some(frame) = rest.get(16..16 + captured_len) else {
            break;
        };
        if let Some(packet) = parse_ethernet(frame) {
            packets.push(packet);
        }
        rest = &rest[16 + captured_len..];
    }
    Ok(packets)
}

/// Parses an Ethernet frame carrying IPv4 and TCP, or returns `None` for anything else.
fn parse_ethernet(frame: &[u8]) -> Option<TcpPacket> {
    let mut ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let mut ip_start = 14;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        ip_start = 18;
    }
    if ethertype != ETHERTYPE_IPV4 {
        return None;
    }
    parse_ipv4(frame.get(ip_start..)?)
}

fn parse_ipv4(packet: &[u8]) -> Option<TcpPacket> {
    let version_ihl = *packet.first()?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    let fragment = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]);
    // More-fragments flag or a non-zero offset: the TCP header may be elsewhere.
    if fragment & 0x3fff != 0 || *packet.get(9)? != IPPROTO_TCP {
        return None;
    }
    // The total length cuts off Ethernet padding. It is 0 on segmentation-offload packets
    // larger than 64 KiB, which then end with the captured frame.
    let end = if total_len == 0 {
        packet.len()
    } else {
        total_len.min(packet.len())
    };
    let src_ip = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst_ip = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let tcp = packet.get(header_len..end)?;

    let src_port = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dst_port = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let seq = u32::from_be_bytes([*tcp.get(4)?, *tcp.get(5)?, *tcp.get(6)?, *tcp.get(7)?]);
    let data_offset = usize::from(*tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    Some(TcpPacket {
        src: SocketAddrV4::new(src_ip, src_port),
        dst: SocketAddrV4::new(dst_ip, dst_port),
        seq,
        flags,
        payload: tcp.get(data_offset..)?.to_vec(),
    })
}

/// Puts each direction's payload in sequence order, dropping retransmitted bytes.
///
/// A SYN starts a new flow even when the addresses and ports repeat, so a reused
/// client port gives two flows. A flow whose SYN was not captured starts at its
/// first captured segment.
fn reassemble(packets: Vec<TcpPacket>) -> Vec<Flow> {
    struct Builder {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        /// Sequence number of the flow's first payload byte.
        base: u32,
        /// Payloads with their offset from `base`.
        chunks: Vec<(u32, Vec<u8>)>,
    }

    let mut builders: Vec<Builder> = Vec::new();
    let mut current: HashMap<(SocketAddrV4, SocketAddrV4), usize> = HashMap::new();
    for packet in packets {
        let key = (packet.src, packet.dst);
        let is_syn = packet.flags & TCP_FLAG_SYN != 0;
        // The SYN takes one sequence number, so data starts one past it.
        let base = if is_syn {
            packet.seq.wrapping_add(1)
        } else {
            packet.seq
        };
        let starts_flow = match current.get(&key) {
            None => true,
            // A retransmitted SYN repeats the sequence number of the flow it started.
            Some(&index) => is_syn && builders[index].base != base,
        };
        if starts_flow {
            current.insert(key, builders.len());
            builders.push(Builder {
                src: packet.src,
                dst: packet.dst,
                base,
                chunks: Vec::new(),
            });
        }
        if packet.payload.is_empty() {
            continue;
        }
        let builder = &mut builders[current[&key]];
        let offset = packet.seq.wrapping_sub(builder.base);
        // Bytes before the base (an offset that wrapped past half the sequence space) were
        // sent before the capture's view of the flow began and cannot be placed.
        if offset >= 1 << 31 {
            continue;
        }
        builder.chunks.push((offset, packet.payload));
    }

    builders
        .into_iter()
        .map(|mut builder| {
            builder.chunks.sort_by_key(|(offset, _)| *offset);
            let mut runs: Vec<Vec<u8>> = Vec::new();
            let mut end: u64 = 0;
            for (offset, payload) in builder.chunks {
                let offset = u64::from(offset);
                let chunk_end = offset + payload.len() as u64;
                if chunk_end <= end && !runs.is_empty() {
                    continue;
                }
                if runs.is_empty() || offset > end {
                    runs.push(payload);
                } else {
                    let new_bytes = &payload[(end - offset) as usize..];
                    if let Some(run) = runs.last_mut() {
                        run.extend_from_slice(new_bytes);
                    }
                }
                end = chunk_end;
            }
            Flow {
                src: builder.src,
                dst: builder.dst,
                runs,
            }
        })
        .collect()
}

/// Walks `stream` record by record from its start, as [`tls_record_counts`] describes.
fn count_tls_records(stream: &[u8]) -> (usize, usize) {
    let mut handshake = 0;
    let mut application_data = 0;
    let mut rest = stream;
    while let Some(header) = rest.get(..5) {
        let content_type = header[0];
        let version = u16::from_be_bytes([header[1], header[2]]);
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let version_ok = version == TLS_RECORD_VERSION
            || (content_type == TLS_HANDSHAKE && version == TLS_CLIENT_HELLO_RECORD_VERSION);
        let type_ok = matches!(
            content_type,
            TLS_CHANGE_CIPHER_SPEC | TLS_ALERT | TLS_HANDSHAKE | TLS_APPLICATION_DATA
        );
        if !version_ok || !type_ok || len > TLS_MAX_RECORD_LEN || rest.len() < 5 + len {
            break;
        }
        match content_type {
            TLS_HANDSHAKE => handshake += 1,
            TLS_APPLICATION_DATA => application_data += 1,
            _ => {}
        }
        rest = &rest[5 + len..];
    }
    (handshake, application_data)
}

fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

fn invalid_data(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 9, 1, 11), 40000);
    const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 9, 2, 11), 15008);

    /// Builds the Ethernet frame of one IPv4 TCP packet.
    fn frame(src: SocketAddrV4, dst: SocketAddrV4, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
        let total_len = (20 + 20 + payload.len()) as u16;
        frame.extend_from_slice(&[0x45, 0]);
        frame.extend_from_slice(&total_len.to_be_bytes());
        // Identification, then the don't-fragment flag with offset 0, TTL 64, TCP.
        frame.extend_from_slice(&[0, 0, 0x40, 0x00, 64, IPPROTO_TCP, 0, 0]);
        frame.extend_from_slice(&src.ip().octets());
        frame.extend_from_slice(&dst.ip().octets());
        frame.extend_from_slice(&src.port().to_be_bytes());
        frame.extend_from_slice(&dst.port().to_be_bytes());
        frame.extend_from_slice(&seq.to_be_bytes());
        // Acknowledgment number, data offset 5 words, flags, window, checksum, urgent.
        frame.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        // Short frames are padded to the 60-byte Ethernet minimum.
        if frame.len() < 60 {
            frame.resize(60, 0);
        }
        frame
    }

    /// Builds a little-endian microsecond pcap file holding `frames`.
    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut file = Vec::new();
        file.extend_from_slice(&0xa1b2_c3d4_u32.to_le_bytes());
        file.extend_from_slice(&2u16.to_le_bytes());
        file.extend_from_slice(&4u16.to_le_bytes());
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&262_144u32.to_le_bytes());
        file.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        for (i, frame) in frames.iter().enumerate() {
            file.extend_from_slice(&(i as u32).to_le_bytes());
            file.extend_from_slice(&0u32.to_le_bytes());
            file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
            file.extend_from_slice(frame);
        }
        file
    }

    fn tls_record(content_type: u8, version: u16, len: usize) -> Vec<u8> {
        let mut record = vec![content_type];
        record.extend_from_slice(&version.to_be_bytes());
        record.extend_from_slice(&(len as u16).to_be_bytes());
        record.resize(5 + len, 0xaa);
        record
    }

    fn flows_of(frames: &[Vec<u8>]) -> Vec<Flow> {
        reassemble(parse_packets(&pcap(frames)).expect("parse pcap"))
    }

    #[test]
    fn segments_parsed_with_addresses() {
        let file = pcap(&[
            frame(CLIENT, SERVER, 100, TCP_FLAG_SYN, b""),
            frame(CLIENT, SERVER, 101, 0x18, b"hello"),
            frame(SERVER, CLIENT, 500, 0x18, b"world!"),
        ]);

        let segments = parse_segments(&file).expect("parse pcap");

        assert_eq!(
            segments,
            [
                Segment {
                    src: CLIENT,
                    dst: SERVER,
                    seq: 101,
                    payload: b"hello".to_vec()
                },
                Segment {
                    src: SERVER,
                    dst: CLIENT,
                    seq: 500,
                    payload: b"world!".to_vec()
                },
            ]
        );
    }

    #[test]
    fn ethernet_padding_not_payload() {
        // "hi" makes a 56-byte frame, padded with zeros to 60.
        let file = pcap(&[frame(CLIENT, SERVER, 1, 0x18, b"hi")]);

        let segments = parse_segments(&file).expect("parse pcap");

        assert_eq!(segments[0].payload, b"hi");
    }

    #[test]
    fn big_endian_file_parsed() {
        let mut file = pcap(&[frame(CLIENT, SERVER, 1, 0x18, b"hi")]);
        // Rewrite the header and the one record header in big-endian order.
        for field in [0..4, 16..20, 20..24, 24..28, 28..32, 32..36, 36..40] {
            file[field].reverse();
        }
        file[4..6].reverse();
        file[6..8].reverse();

        let segments = parse_segments(&file).expect("parse big-endian pcap");

        assert_eq!(segments[0].payload, b"hi");
    }

    #[test]
    fn non_tcp_and_non_ipv4_skipped() {
        let mut udp = frame(CLIENT, SERVER, 1, 0x18, b"udp");
        udp[14 + 9] = 17;
        let mut ipv6 = frame(CLIENT, SERVER, 1, 0x18, b"v6");
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        let mut fragment = frame(CLIENT, SERVER, 1, 0x18, b"frag");
        fragment[14 + 6..14 + 8].copy_from_slice(&0x0010u16.to_be_bytes());

        let segments = parse_segments(&pcap(&[udp, ipv6, fragment])).expect("parse pcap");

        assert!(segments.is_empty(), "{segments:?}");
    }

    #[test]
    fn vlan_tagged_frame_parsed() {
        let mut tagged = frame(CLIENT, SERVER, 1, 0x18, b"tagged");
        tagged.splice(12..12, [0x81, 0x00, 0x00, 0x07]);

        let segments = parse_segments(&pcap(&[tagged])).expect("parse pcap");

        assert_eq!(segments[0].payload, b"tagged");
    }

    #[test]
    fn truncated_last_record_ignored() {
        let mut file = pcap(&[
            frame(CLIENT, SERVER, 1, 0x18, b"whole"),
            frame(CLIENT, SERVER, 6, 0x18, b"cut off"),
        ]);
        file.truncate(file.len() - 3);

        let segments = parse_segments(&file).expect("parse pcap");

        assert_eq!(segments.len(), 1);
        assert_eq!(segments[0].payload, b"whole");
    }

    #[test]
    fn bad_files_rejected() {
        let mut pcapng = pcap(&[]);
        pcapng[..4].copy_from_slice(&[0x0a, 0x0d, 0x0d, 0x0a]);
        let mut linux_cooked = pcap(&[]);
        linux_cooked[20..24].copy_from_slice(&113u32.to_le_bytes());

        for (case, file) in [
            ("short", vec![0; 10]),
            ("pcapng", pcapng),
            ("cooked", linux_cooked),
        ] {
            let err = parse_segments(&file).expect_err(case);
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{case}");
        }
    }

    #[test]
    fn flow_reordered_and_deduplicated() {
        let flows = flows_of(&[
            frame(CLIENT, SERVER, 1000, TCP_FLAG_SYN, b""),
            frame(CLIENT, SERVER, 1006, 0x18, b"world"),
            frame(CLIENT, SERVER, 1001, 0x18, b"hello"),
            // A retransmission overlapping both earlier segments.
            frame(CLIENT, SERVER, 1003, 0x18, b"llowo"),
            frame(CLIENT, SERVER, 1011, 0x18, b"!"),
        ]);

        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].runs, [b"helloworld!".to_vec()]);
    }

    #[test]
    fn flow_gap_splits_runs() {
        let flows = flows_of(&[
            frame(CLIENT, SERVER, 1, 0x18, b"abc"),
            frame(CLIENT, SERVER, 10, 0x18, b"xyz"),
        ]);

        assert_eq!(flows[0].runs, [b"abc".to_vec(), b"xyz".to_vec()]);
    }

    #[test]
    fn syn_starts_new_flow_on_reused_port() {
        let flows = flows_of(&[
            frame(CLIENT, SERVER, 100, TCP_FLAG_SYN, b""),
            // A retransmitted SYN continues the same flow.
            frame(CLIENT, SERVER, 100, TCP_FLAG_SYN, b""),
            frame(CLIENT, SERVER, 101, 0x18, b"first"),
            frame(CLIENT, SERVER, 9000, TCP_FLAG_SYN, b""),
            frame(CLIENT, SERVER, 9001, 0x18, b"second"),
        ]);

        let runs: Vec<&[u8]> = flows.iter().map(|flow| flow.runs[0].as_slice()).collect();
        assert_eq!(runs, [b"first".as_slice(), b"second".as_slice()]);
    }

    #[test]
    fn sequence_wraparound_kept_in_order() {
        let flows = flows_of(&[
            frame(CLIENT, SERVER, u32::MAX - 2, 0x18, b"abc"),
            frame(CLIENT, SERVER, 0, 0x18, b"def"),
        ]);

        assert_eq!(flows[0].runs, [b"abcdef".to_vec()]);
    }

    #[test]
    fn marker_found_across_segments() {
        let file = pcap(&[
            frame(CLIENT, SERVER, 1, 0x18, b"xxsecr"),
            frame(SERVER, CLIENT, 1, 0x18, b"noise"),
            frame(CLIENT, SERVER, 7, 0x18, b"et-markerxx"),
        ]);
        let flows = reassemble(parse_packets(&file).expect("parse pcap"));

        let found = |marker: &[u8]| {
            flows
                .iter()
                .flat_map(|flow| &flow.runs)
                .any(|run| contains_bytes(run, marker))
        };
        assert!(found(b"secret-marker"));
        assert!(!found(b"secret-marker-noise"));
    }

    #[test]
    fn tls_records_counted_across_segments() {
        let mut client_bytes = tls_record(TLS_HANDSHAKE, TLS_CLIENT_HELLO_RECORD_VERSION, 200);
        client_bytes.extend(tls_record(TLS_CHANGE_CIPHER_SPEC, TLS_RECORD_VERSION, 1));
        client_bytes.extend(tls_record(TLS_APPLICATION_DATA, TLS_RECORD_VERSION, 60));
        client_bytes.extend(tls_record(TLS_APPLICATION_DATA, TLS_RECORD_VERSION, 3000));
        // A record cut off by the end of the capture is not counted.
        client_bytes.extend(&tls_record(TLS_APPLICATION_DATA, TLS_RECORD_VERSION, 100)[..50]);
        let mut server_bytes = tls_record(TLS_HANDSHAKE, TLS_RECORD_VERSION, 90);
        server_bytes.extend(tls_record(TLS_APPLICATION_DATA, TLS_RECORD_VERSION, 10));

        let mut frames = vec![frame(CLIENT, SERVER, 0, TCP_FLAG_SYN, b"")];
        for (i, chunk) in client_bytes.chunks(1000).enumerate() {
            frames.push(frame(CLIENT, SERVER, 1 + 1000 * i as u32, 0x18, chunk));
        }
        frames.push(frame(SERVER, CLIENT, 77, 0x18, &server_bytes));
        let flows = flows_of(&frames);

        let counts: Vec<(usize, usize)> = flows
            .iter()
            .map(|flow| count_tls_records(&flow.runs[0]))
            .collect();
        assert_eq!(counts, [(1, 2), (1, 1)]);
    }

    #[test]
    fn plaintext_counts_no_tls_records() {
        assert_eq!(count_tls_records(b"GET / HTTP/1.1\r\n\r\n"), (0, 0));
    }

    #[test]
    fn tls_walk_stops_at_old_version() {
        let mut bytes = tls_record(TLS_APPLICATION_DATA, TLS_RECORD_VERSION, 4);
        bytes.extend(tls_record(TLS_APPLICATION_DATA, 0x0301, 4));
        bytes.extend(tls_record(TLS_APPLICATION_DATA, TLS_RECORD_VERSION, 4));

        assert_eq!(count_tls_records(&bytes), (0, 1));
    }

    #[test]
    fn helpers_read_file() {
        let dir = std::env::temp_dir().join(format!("interceptor-pcap-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create temp dir");
        let path = dir.join("capture.pcap");
        let mut tls = tls_record(TLS_HANDSHAKE, TLS_RECORD_VERSION, 8);
        tls.extend(tls_record(TLS_APPLICATION_DATA, TLS_RECORD_VERSION, 8));
        let file = pcap(&[
            frame(CLIENT, SERVER, 1, 0x18, &tls),
            frame(SERVER, CLIENT, 1, 0x18, b"plain marker"),
        ]);
        fs::write(&path, file).expect("write pcap");

        let segments = tcp_payloads(&path);
        let marker_found = contains(&path, b"plain marker");
        let counts = tls_record_counts(&path, SERVER.port());
        let other_port_counts = tls_record_counts(&path, 443);
        fs::remove_dir_all(&dir).expect("remove temp dir");

        assert_eq!(segments.len(), 2);
        assert!(marker_found);
        assert_eq!(counts, (1, 1));
        assert_eq!(other_port_counts, (0, 0));
    }
}
