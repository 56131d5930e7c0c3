//! AFL target `digest`: see [`sipedge_fuzz::digest`].

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sipedge_fuzz::digest(data);
    });
}
