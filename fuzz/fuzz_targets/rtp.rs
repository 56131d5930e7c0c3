//! AFL target `rtp`: see [`sipedge_fuzz::rtp`].

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sipedge_fuzz::rtp(data);
    });
}
