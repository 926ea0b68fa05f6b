"""Production profile (PostgreSQL + RabbitMQ, daemon with 2 workers): a campaign (labeling -> training) whose
daemon is killed with SIGKILL in the middle, a cached rerun, and 100 labelings through the daemon.

Each module run makes its own database and profile (tests/production_fixtures.py) and removes them again.
"""
import collections
import json
import os
import subprocess
import sys
import time

import pytest

from .production_fixtures import BIN, PW_PROCESS_TYPE, production_profile  # noqa: F401  (fixture)

pytestmark = pytest.mark.pw

LOAD_JOBS = 100


def run_setup(tmp_path, *args):
    env = {key: value for key, value in os.environ.items() if key != 'AIIDA_MLIP_PROFILE'}
    env['AIIDA_PATH'] = str(tmp_path)
    return subprocess.run([str(BIN / 'aiida-mlip'), 'setup', '--no-pseudos', *args], capture_output=True,
                          text=True, env=env, timeout=300)


# ---- setup: clear refusals, nothing half-made ------------------------------------------------------------------

def test_setup_refuses_unreachable_postgres_and_creates_nothing(tmp_path):
    result = run_setup(tmp_path, '--profile-name', 'nopg', '--storage', 'psql', '--db-port', '1', '--broker', 'none')
    assert result.returncode == 2, result.stderr
    assert 'PostgreSQL does not answer on 127.0.0.1:1' in result.stderr
    config = tmp_path / '.aiida' / 'config.json'
    assert not config.exists() or 'nopg' not in json.loads(config.read_text()).get('profiles', {})


def test_setup_refuses_unreachable_rabbitmq_before_creating_a_database(tmp_path):
    result = run_setup(tmp_path, '--profile-name', 'normq', '--storage', 'psql', '--broker', 'rabbitmq',
                       '--broker-port', '1')
    assert result.returncode == 2, result.stderr
    assert 'RabbitMQ does not answer on amqp://guest@127.0.0.1:1/' in result.stderr
    from aiida_mlip.setup.environment import PostgresServer

    try:
        postgres = PostgresServer().connect()
    except ConnectionError:
        return  # no local PostgreSQL: the refusal above is all there is to see
    assert not postgres.db_exists('aiida-normq')


def test_setup_makes_a_psql_rabbitmq_profile(production_profile):
    assert f'profile `{production_profile.name}`: created (storage core.psql_dos, broker core.rabbitmq)' \
        in production_profile.setup_output
    assert production_profile.storage['database_name'] == f'aiida-{production_profile.name}'
    assert production_profile.sql('SELECT count(*) FROM db_dbcomputer')[0][0] == 1
    status = production_profile.verdi('status', check=False).stdout
    assert 'rabbitmq' in status.lower() and 'postgresql' in status.lower()
    assert len(production_profile.worker_pids()) == 2
    # Setting up again reuses everything: no second database, no error.
    again = production_profile._run(BIN / 'aiida-mlip', 'setup', '--profile-name', production_profile.name,
                                    '--storage', 'psql', '--broker', 'rabbitmq', '--no-pseudos')
    assert 'exists' in again.stdout


# ---- a campaign (labeling -> training) on the daemon, killed with SIGKILL in the middle -------------------------------

#: One class, 5 volumes + 5 rattles of Si2 and the isolated atom (its 10 Å box is the slowest pw.x: it is still
#: running when the first Si2 finishes), a tiny model; pw.x through the code that logs every execution.
CAMPAIGN = """
name: production_sigkill
pseudo_family: PBE-QE-local
codes: {pw: pw-counted@localhost}
dft: {protocol: fast, ecutwfc: 20.0, ecutrho: 160.0, kpoints_distance: 0.6, isolated_atoms: true}
classes:
  silicon:
    materials:
      - {formula: Si, prototype: diamond, a: 5.43}
sampling:
  volumes: [-0.04, -0.02, 0.0, 0.02, 0.04]
  rattle: {amplitude: 0.06, count: 5, seed: 7}
training:
  protocol: fast
  split_fractions: {train: 0.6, valid: 0.2, test: 0.2}
  mace: {max_num_epochs: 5, batch_size: 2, valid_batch_size: 2}
"""
CAMPAIGN_FRAMES = 11


@pytest.fixture(scope='module')
def killed_campaign(production_profile):
    """`aiida-mlip campaign submit`; when some but not all pw.x runs have finished, SIGKILL the daemon (arbiter,
    workers), restart it, and wait for the campaign."""
    profile = production_profile
    (profile.folder / 'campaign.yaml').write_text(CAMPAIGN)
    start = time.perf_counter()
    before = profile.max_pk()
    output = profile._run(BIN / 'aiida-mlip', '-p', profile.name, 'campaign', 'submit', 'campaign.yaml').stdout
    campaign = int(output.split('CampaignWorkChain<')[1].split('>')[0])
    deadline = time.monotonic() + 900
    while (finished := profile.count_pw(after=before)) < 1:
        assert time.monotonic() < deadline, 'no pw.x finished'
        time.sleep(0.2)
    workers = profile.worker_pids()
    killed = profile.kill_daemon()
    finished_at_kill = profile.count_pw(after=before)
    runs_at_kill = profile.pw_runs()
    time.sleep(2)  # the arbiter's death is final: nothing respawns the workers
    alive_after_kill = profile.daemon_pids()
    profile.start_daemon(2)
    states = profile.wait_terminated([campaign], timeout=1200)
    seconds = time.perf_counter() - start
    print(f'\ncampaign with SIGKILL: {seconds:.1f} s; killed {len(killed)} daemon processes when '
          f'{finished}/{CAMPAIGN_FRAMES} pw.x had finished ({finished_at_kill} a moment later)')
    return {'campaign': campaign, 'states': states, 'killed': killed, 'workers': workers,
            'alive_after_kill': alive_after_kill, 'finished_at_kill': finished_at_kill, 'runs_at_kill': runs_at_kill,
            'frames': profile.driver('frames', str(campaign)), 'seconds': seconds}


def test_campaign_finishes_after_sigkill_of_the_daemon(killed_campaign):
    assert len(killed_campaign['workers']) == 2 and set(killed_campaign['workers']) < set(killed_campaign['killed'])
    assert killed_campaign['alive_after_kill'] == []
    assert 1 <= killed_campaign['finished_at_kill'] < CAMPAIGN_FRAMES  # the kill landed in the middle
    assert killed_campaign['states'] == {('finished', '0'): 1}, killed_campaign['states']
    frames = killed_campaign['frames']
    assert frames['models'] == ['member_0']
    # aiida-core 2.9 gap: a PwCalculation whose worker died between upload and the next checkpoint is parsed but
    # has no `remote_folder` output; its PwBaseWorkChain then fails with 11 (missing output). The labeling takes
    # that frame's labels from the PwCalculation (labeled_outputs): no frame is lost.
    assert frames['dropped'] == [] and frames['n_frames'] == CAMPAIGN_FRAMES, frames
    assert frames['salvaged'] == frames['no_remote_folder'], frames
    print(f'\nSIGKILL: {len(frames["salvaged"])} frame(s) taken from calculations without remote_folder, '
          f'{len(frames["unsealed"])} calculation(s) left unsealed')


def test_no_finished_pw_run_is_repeated(killed_campaign, production_profile):
    frames = killed_campaign['frames']
    assert frames['ok'] and len(frames['frames']) == CAMPAIGN_FRAMES
    ended_before_kill = {folder for event, folder in killed_campaign['runs_at_kill'] if event == 'end'}
    repeated_calculations = 0
    for key, calcs in frames['frames'].items():
        finished = sorted((calc for calc in calcs if calc['state'] == 'finished' and
                           (calc['exit_status'] == 0 or calc['exit_status'] == 11 and not calc['remote_folder'])),
                          key=lambda calc: calc['pk'])
        assert finished, (key, calcs)
        # aiida-core runs a workflow step at least once: a PwBaseWorkChain whose worker died after it launched its
        # PwCalculation and before its checkpoint launches another on resume, and both finish. Only a calculation
        # still running at the kill may be doubled so; one that had ended before it never is.
        assert not any(calc['folder'] in ended_before_kill for calc in finished[:-1]), (key, calcs, ended_before_kill)
        repeated_calculations += len(finished) - 1
    # The pw.x executions themselves (logged by the code around the binary): every job folder ran pw.x to its end,
    # and no run that had ended before the kill was started again.
    runs = production_profile.pw_runs()
    chain_folders = {calc['folder'] for calcs in frames['frames'].values() for calc in calcs}
    ends = collections.Counter(folder for event, folder in runs if event == 'end' and folder in chain_folders)
    starts = collections.Counter(folder for event, folder in runs if event == 'start' and folder in chain_folders)
    assert set(ends) == chain_folders, ends
    assert ended_before_kill and all(starts[folder] == 1 for folder in ended_before_kill), (ended_before_kill, starts)
    # aiida-core's submission is at-least-once: a job the scheduler had started but whose job id the killed worker
    # had not yet stored is submitted again in the same folder on resume. Only runs in flight at the kill may repeat.
    repeated = {folder for folder, count in starts.items() if count > 1}
    assert not repeated & ended_before_kill
    assert len(repeated) <= len(killed_campaign['workers']), starts
    print(f'\nSIGKILL: {len(ended_before_kill)} pw.x ended before the kill, none started again; '
          f'{len(repeated)} job(s) in flight at the kill submitted again, {repeated_calculations} calculation(s) '
          'launched again by a resumed PwBaseWorkChain')


# ---- load: 100 labelings through 2 daemon workers ------------------------------------------------------------------

def test_hundred_labelings_through_two_workers(production_profile):
    from .production_fixtures import rabbitmq_queue_message_count

    profile = production_profile
    before = profile.max_pk()
    start = time.perf_counter()
    pks = profile.driver('load', str(LOAD_JOBS), timeout=1800)['pks']
    submitted = time.perf_counter() - start
    states = profile.wait_terminated(pks, timeout=1800)
    wall = time.perf_counter() - start
    assert len(set(pks)) == LOAD_JOBS
    assert states == {('finished', '0'): LOAD_JOBS}, states
    assert profile.count_pw(after=before) == LOAD_JOBS  # one pw.x per labeling: none lost, none repeated
    span = profile.sql('SELECT extract(epoch FROM max(mtime) - min(ctime)) FROM db_dbnode WHERE id = ANY(%s)',
                       (pks,))[0][0]
    assert rabbitmq_queue_message_count(profile.launch_queue) == 0  # no task left behind
    print(f'\nload: {LOAD_JOBS} labelings (1 Si2 pw.x each), 2 workers: submitted in {submitted:.1f} s, all '
          f'finished in {wall:.1f} s wall ({float(span):.1f} s first creation to last change, '
          f'{wall / LOAD_JOBS:.2f} s per labeling); load average {os.getloadavg()[0]:.1f}')
    sys.stdout.flush()


def test_cached_rerun_runs_zero_pw(production_profile):
    """A labeling, then caching on for pw.x in the profile (daemon restarted to read it): the same labeling
    again runs no pw.x, every calculation comes from the cache."""
    profile = production_profile
    first = profile.driver('labeling', '4')['pk']
    assert profile.wait_terminated([first], timeout=600) == {('finished', '0'): 1}
    original = profile.driver('frames', str(first))
    profile.verdi('config', 'set', 'caching.enabled_for', PW_PROCESS_TYPE)
    profile.verdi('daemon', 'restart')
    runs_before = len(profile.pw_runs())
    rerun_pk = profile.driver('rerun', str(first))['pk']
    assert profile.wait_terminated([rerun_pk], timeout=600) == {('finished', '0'): 1}
    rerun = profile.driver('frames', str(rerun_pk))
    assert len(profile.pw_runs()) == runs_before  # zero pw.x executions
    assert rerun['n_frames'] == 4 and rerun['energies'] == original['energies']
    for key, calcs in rerun['frames'].items():
        assert len(calcs) == 1 and calcs[0]['cached_from'] == original['uuids'][key], (key, calcs)
