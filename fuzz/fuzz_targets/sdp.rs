//! AFL target `sdp`: see [`sipedge_fuzz::sdp`].

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sipedge_fuzz::sdp(data);
    });
}
