//! virtio-net hot path: packets per second through vmm-core's `Net`,
//! against a naive device over the same queues.
//!
//! One tx iteration: the driver publishes a packet's chain again, the
//! device pops it, copies it out of guest memory and hands it to a backend
//! that drops it. One rx iteration: the driver publishes receive chains
//! again, the backend hands out one packet (copying it into the buffer it
//! is given, as a tap's `read` does), the device puts it into the chains
//! (mergeable buffers of 4 KiB) and returns them. Two sizes: a 1514-byte
//! frame, and a 64 KiB segmentation offload (tx: header plus 16 buffers of
//! 4 KiB; rx: 16 chains).
//!
//! The naive device is what one writes without care for the copies: per
//! packet it copies each descriptor into a freshly allocated `Vec`, joins
//! them into another, and sends that; it reads each packet into a freshly
//! allocated buffer and writes each piece through another `Vec`. Both use
//! vmm-core's `Queue`, so the difference is the data path alone.
//!
//! After the criterion groups, `cargo bench` also prints packets per
//! second of both, from a plain timing loop (best of several runs).
//!
//! Guest memory is the production adapter `platform_x86_64::GuestRam`,
//! which exists on x86_64 hosts only; elsewhere the bench does nothing.

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    use criterion::{criterion_group, Criterion, Throughput};
    use platform_x86_64::GuestRam;
    use vm_memory::{GuestAddress as VmAddress, GuestMemoryMmap};
    use vmm_core::devices::net::{
        Net, NetBackend, NetBackendError, NetConfig, HEADER_SIZE, MAX_PACKET_SIZE, NET_QUEUE_SIZE,
        RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MRG_RXBUF,
    };
    use vmm_core::irq::CountingIrq;
    use vmm_core::memory::{GuestAddress, GuestMemory};
    use vmm_core::mmio::{Interrupt, VirtioContext, VirtioDevice};
    use vmm_core::queue::mock::MockSplitQueue;
    use vmm_core::queue::{Descriptor, Queue, VIRTIO_RING_F_EVENT_IDX, VIRTQ_DESC_F_WRITE};

    const MEM_SIZE: usize = 4 << 20;
    const RX_RING: GuestAddress = GuestAddress(0x1000);
    const TX_RING: GuestAddress = GuestAddress(0x4000);
    const TX_BUFS: u64 = 0x10_0000;
    const RX_BUFS: u64 = 0x20_0000;
    /// Size of each buffer but a tx header's.
    const SEG: usize = 4096;
    /// Buffers per chain the naive device takes.
    const CAPACITY: usize = 64;
    const FEATURES: u64 = (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_RING_F_EVENT_IDX);
    /// Runs of the plain timing loop per case and device; the best counts.
    const RUNS: u32 = 11;

    struct Case {
        name: &'static str,
        /// Ethernet frame bytes.
        frame: usize,
    }

    const CASES: [Case; 2] = [
        Case {
            name: "1514",
            frame: 1514,
        },
        Case {
            name: "64k-gso",
            frame: 65000,
        },
    ];

    /// A tap that drops what it is sent and has one packet to read each
    /// time it is told to.
    struct Tap {
        packet: Vec<u8>,
        sent: usize,
        reads_left: u32,
    }

    impl NetBackend for Tap {
        fn send(&mut self, packet: &[u8]) -> Result<(), NetBackendError> {
            self.sent = self.sent.wrapping_add(black_box(packet).len());
            Ok(())
        }

        fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, NetBackendError> {
            if self.reads_left == 0 {
                return Ok(None);
            }
            self.reads_left -= 1;
            let n = self.packet.len();
            buf[..n].copy_from_slice(&self.packet);
            Ok(Some(n))
        }

        fn set_offloads(&mut self, _: u64) -> Result<(), NetBackendError> {
            Ok(())
        }
    }

    /// Guest memory, both rings, and the chains of one case laid out.
    struct Rig<'m> {
        mem: &'m GuestRam,
        rx: MockSplitQueue<'m, GuestRam>,
        tx: MockSplitQueue<'m, GuestRam>,
        queues: [Queue; 2],
        interrupt: Interrupt<CountingIrq>,
        tx_head: u16,
        rx_heads: Vec<u16>,
    }

    impl<'m> Rig<'m> {
        fn new(mem: &'m GuestRam, case: &Case) -> Self {
            let mut rx = MockSplitQueue::new(mem, RX_RING, NET_QUEUE_SIZE).unwrap();
            let mut tx = MockSplitQueue::new(mem, TX_RING, NET_QUEUE_SIZE).unwrap();
            let mut tx_bufs = vec![Descriptor {
                addr: GuestAddress(TX_BUFS),
                len: HEADER_SIZE as u32,
                flags: 0,
                next: 0,
            }];
            for (i, at) in (0..case.frame).step_by(SEG).enumerate() {
                tx_bufs.push(Descriptor {
                    addr: GuestAddress(TX_BUFS + 0x1000 + (SEG * i) as u64),
                    len: (case.frame - at).min(SEG) as u32,
                    flags: 0,
                    next: 0,
                });
            }
            let tx_head = tx.add_chain(&tx_bufs).unwrap();
            let packet_len = HEADER_SIZE + case.frame;
            let rx_heads = (0..packet_len.div_ceil(SEG))
                .map(|i| {
                    rx.add_chain(&[Descriptor {
                        addr: GuestAddress(RX_BUFS + (SEG * i) as u64),
                        len: SEG as u32,
                        flags: VIRTQ_DESC_F_WRITE,
                        next: 0,
                    }])
                    .unwrap()
                })
                .collect();
            let queues = [rx.create_queue(FEATURES), tx.create_queue(FEATURES)];
            Rig {
                mem,
                rx,
                tx,
                queues,
                interrupt: Interrupt::new(CountingIrq::default()),
                tx_head,
                rx_heads,
            }
        }

        fn ctx(&mut self) -> VirtioContext<'_, GuestRam, CountingIrq> {
            VirtioContext {
                mem: self.mem,
                queues: &mut self.queues,
                interrupt: &mut self.interrupt,
                features: FEATURES,
            }
        }

        /// The driver posts the tx chain again.
        fn republish_tx(&mut self) {
            self.tx.publish(self.tx_head).unwrap();
        }

        /// The driver posts the rx chains again.
        fn republish_rx(&mut self) {
            for &head in &self.rx_heads {
                self.rx.publish(head).unwrap();
            }
        }
    }

    fn guest_ram() -> GuestRam {
        GuestRam::new(GuestMemoryMmap::<()>::from_ranges(&[(VmAddress(0), MEM_SIZE)]).unwrap())
    }

    fn tap(case: &Case) -> Tap {
        let mut packet = vec![0u8; HEADER_SIZE];
        packet.extend((0..case.frame).map(|i| i as u8));
        Tap {
            packet,
            sent: 0,
            reads_left: 0,
        }
    }

    fn device(case: &Case) -> Box<Net<Tap>> {
        let config = NetConfig {
            mac: [0x02, 0, 0, 0, 0, 1],
            mtu: 1500,
            offloads: true,
        };
        Box::new(Net::new(config, tap(case)).unwrap())
    }

    /// The chains are already published once: consume them first.
    fn first_round(rig: &mut Rig<'_>, dev: &mut Net<Tap>) {
        dev.activate(&mut rig.ctx()).unwrap();
        dev.queue_notify(TX_QUEUE, &mut rig.ctx()).unwrap();
        dev.backend_mut().reads_left = 1;
        dev.process_rx(&mut rig.ctx()).unwrap();
        assert_eq!(dev.stats().rx_frames, 1);
    }

    #[inline(never)]
    fn device_tx(rig: &mut Rig<'_>, dev: &mut Net<Tap>) {
        rig.republish_tx();
        dev.queue_notify(TX_QUEUE, &mut rig.ctx()).unwrap();
    }

    #[inline(never)]
    fn device_rx(rig: &mut Rig<'_>, dev: &mut Net<Tap>) {
        rig.republish_rx();
        dev.backend_mut().reads_left = 1;
        dev.process_rx(&mut rig.ctx()).unwrap();
    }

    /// The naive device's tx: every descriptor through a fresh `Vec`.
    #[inline(never)]
    fn naive_tx(rig: &mut Rig<'_>, tap: &mut Tap) {
        rig.republish_tx();
        let mem = rig.mem;
        let queue = &mut rig.queues[usize::from(TX_QUEUE)];
        while let Some(chain) = queue.pop::<CAPACITY, _>(mem).unwrap() {
            let mut packet = Vec::new();
            for d in chain.descriptors() {
                let mut piece = vec![0u8; d.len as usize];
                mem.read(d.addr, &mut piece).unwrap();
                packet.extend_from_slice(&piece);
            }
            tap.send(&packet).unwrap();
            queue.add_used(mem, chain.head_index(), 0).unwrap();
        }
        if queue.needs_notification(mem).unwrap() {
            rig.interrupt.signal_used_buffer();
        }
    }

    /// The naive device's rx: a fresh buffer per packet, a fresh `Vec` per
    /// piece.
    #[inline(never)]
    fn naive_rx(rig: &mut Rig<'_>, tap: &mut Tap) {
        rig.republish_rx();
        tap.reads_left = 1;
        let mem = rig.mem;
        let queue = &mut rig.queues[usize::from(RX_QUEUE)];
        let mut buf = vec![0u8; MAX_PACKET_SIZE];
        let n = tap.recv(&mut buf).unwrap().unwrap();
        let mut used = Vec::new();
        let mut placed = 0;
        while placed < n {
            let chain = queue.pop::<CAPACITY, _>(mem).unwrap().unwrap();
            let start = placed;
            for d in chain.descriptors() {
                let k = (d.len as usize).min(n - placed);
                let piece = buf[placed..placed + k].to_vec();
                mem.write(d.addr, &piece).unwrap();
                placed += k;
            }
            used.push((chain.head_index(), (placed - start) as u32, chain));
        }
        let count = (used.len() as u16).to_le_bytes();
        let first = used[0].2.descriptors()[0].addr;
        mem.write(first.checked_add(10).unwrap(), &count).unwrap();
        for (head, len, _) in used {
            queue.add_used(mem, head, len).unwrap();
        }
        if queue.needs_notification(mem).unwrap() {
            rig.interrupt.signal_used_buffer();
        }
    }

    fn packets(c: &mut Criterion) {
        let mem = guest_ram();
        for (dir, device_round, naive_round) in [
            (
                "tx",
                device_tx as fn(&mut Rig<'_>, &mut Net<Tap>),
                naive_tx as fn(&mut Rig<'_>, &mut Tap),
            ),
            ("rx", device_rx, naive_rx),
        ] {
            let mut group = c.benchmark_group(format!("net_{dir}"));
            group.throughput(Throughput::Elements(1));
            for case in &CASES {
                group.bench_function(format!("vmm-core/{}", case.name), |b| {
                    let mut rig = Rig::new(&mem, case);
                    let mut dev = device(case);
                    first_round(&mut rig, &mut dev);
                    b.iter(|| device_round(&mut rig, &mut dev));
                });
                group.bench_function(format!("naive/{}", case.name), |b| {
                    let mut rig = Rig::new(&mem, case);
                    let mut dev = device(case);
                    first_round(&mut rig, &mut dev);
                    let mut tap = tap(case);
                    b.iter(|| naive_round(&mut rig, &mut tap));
                });
            }
            group.finish();
        }
    }

    /// Packets per second of `round`, best of [`RUNS`] runs of `n`.
    fn rate(n: u32, mut round: impl FnMut()) -> f64 {
        let mut best = Duration::MAX;
        for _ in 0..RUNS {
            let start = Instant::now();
            for _ in 0..n {
                round();
            }
            best = best.min(start.elapsed());
        }
        f64::from(n) / best.as_secs_f64()
    }

    fn print_rates() {
        let mem = guest_ram();
        for case in &CASES {
            let n = (20_000_000 / case.frame).clamp(500, 20_000) as u32;
            let mut line = format!("{:>8}:", case.name);
            for dir in ["tx", "rx"] {
                let mut rig = Rig::new(&mem, case);
                let mut dev = device(case);
                first_round(&mut rig, &mut dev);
                let ours = if dir == "tx" {
                    rate(n, || device_tx(&mut rig, &mut dev))
                } else {
                    rate(n, || device_rx(&mut rig, &mut dev))
                };
                assert_eq!(dev.stats().rejected, 0);
                let mut tap = tap(case);
                let naive = if dir == "tx" {
                    rate(n, || naive_tx(&mut rig, &mut tap))
                } else {
                    rate(n, || naive_rx(&mut rig, &mut tap))
                };
                line.push_str(&format!(
                    " {dir} vmm-core {:.2} Mpps, naive {:.2} Mpps ({:.2}x);",
                    ours / 1e6,
                    naive / 1e6,
                    ours / naive
                ));
            }
            println!("{line}");
        }
    }

    criterion_group! {
        name = benches;
        config = Criterion::default()
            .measurement_time(Duration::from_secs(2))
            .warm_up_time(Duration::from_millis(500));
        targets = packets
    }

    pub fn main() {
        benches();
        Criterion::default().configure_from_args().final_summary();
        // `cargo bench` passes `--bench`; `cargo test --benches` does not,
        // and only smoke-tests the criterion groups.
        if std::env::args().any(|a| a == "--bench") {
            print_rates();
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86_64::main();
}
