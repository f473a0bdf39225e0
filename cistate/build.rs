// `sqlx::migrate!` embeds `migrations/` at compile time but cannot see new files by itself:
// rebuild when the directory changes, so a new migration is never silently missing.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
